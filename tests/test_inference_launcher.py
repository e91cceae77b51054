"""``lvita generate`` and ``lvita eval`` with ``--sp/--ring/--mode`` under the ``deepspeed`` launcher
(2 CPU processes, gloo), as a user runs them: the same tokens as the single-process command, printed
or written once (rank 0). tests/test_cp_generate.py checks the decoder functions; this checks the
command line, the launcher's process group and rank-0-only output around them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from tests.distributed import THREADS, free_port

PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    from lvita.ckpt.hf import write_hf_dir
    from lvita.data.tokenizer import load_tokenizer, special_token_ids
    from lvita.model.longvita import LongVita

    root = tmp_path_factory.mktemp("launcher")
    img = special_token_ids(load_tokenizer(tokenizer_dir))["img_context"]
    model = LongVita("tiny", img, seed=11)
    with torch.no_grad():  # sharper attention: at init the answer hardly depends on the context (one token
        for name, p in model.named_parameters():  # repeated), so a wrong shard or position would go unseen
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                p.mul_(8)
    hf = write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, root / "hf", img)
    Image.new("RGB", (200, 90), "red").save(root / "wide.png")  # 2 tiles + thumbnail
    items = [{"id": "img", "images": ["wide.png"], "messages": [{"role": "user", "content": "<image>\nColour?"},
                                                               {"role": "assistant", "content": "red"}]},
             {"id": "txt", "messages": [{"role": "user", "content": "What is 2 + 2?"},
                                        {"role": "assistant", "content": "4"}]}]
    (root / "set.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return root, hf


def _launch(module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": THREADS}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_generate_under_the_launcher_ring_recompute(setup, capsys):
    from lvita.infer.generate import main

    root, hf = setup
    args = ["--model", str(hf), "--prompt", PROMPT, "--image", str(root / "wide.png"), "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(args) == 0
    ref = capsys.readouterr().out.strip()
    assert ref
    proc = _launch("lvita.generate", *args, "--sp", "2", "--ring", "2", "--mode", "recompute")
    answers = [line for line in proc.stdout.splitlines() if line.strip() == ref]
    assert len(answers) == 1, proc.stdout[-3000:]  # the same answer, printed by rank 0 only


def test_eval_under_the_launcher_ulysses_cache(setup):
    from lvita.eval import main

    root, hf = setup
    args = ["--model", str(hf), "--data", str(root / "set.jsonl"), "--max-new-tokens", "12"]
    assert main([*args, "--out", str(root / "ref")]) == 0
    _launch("lvita.eval", *args, "--out", str(root / "cp"), "--sp", "2", "--mode", "cache")

    def preds(d):
        return [(p["id"], p["prediction"], p["stop"]) for p in
                map(json.loads, (root / d / "predictions.jsonl").read_text().splitlines())]

    assert preds("cp") == preds("ref") and len(preds("ref")) == 2
    assert len({p for _, p, _ in preds("ref")}) == 2  # the answers differ with the question
    assert json.loads((root / "cp" / "results.json").read_text())["answered"] == 2


def test_benchmark_under_the_launcher_ring(setup, tmp_path):
    """``lvita eval --benchmark`` context-parallel (--sp 2 --ring 2): rank 0 decodes the TSV's images, both ranks
    answer, rank 0 alone writes; the same predictions and scores as one process."""
    from lvita import eval as lveval
    from tests.test_eval_image import b64png, write_tsv

    _, hf = setup
    opts = {"A": "red", "B": "blue", "C": "green", "D": "pink"}
    data = write_tsv(tmp_path / "MMStar.tsv", [
        {"index": 0, "image": b64png("red", (200, 90)), "question": "Colour?", **opts, "answer": "A",
         "category": "coarse perception", "l2-category": "colour"},
        {"index": 1, "image": b64png("blue"), "question": "Which colour is it?", **opts, "answer": "B",
         "category": "fine-grained perception", "l2-category": "colour"}])
    args = ["--model", str(hf), "--benchmark", "MMStar", "--data", str(data), "--max-new-tokens", "8"]
    assert lveval.main([*args, "--out", str(tmp_path / "ref")]) == 0
    _launch("lvita.eval", *args, "--out", str(tmp_path / "cp"), "--sp", "2", "--ring", "2")

    def preds(d):
        return [(p["id"], p["prediction"]) for p in
                map(json.loads, (tmp_path / d / "predictions.jsonl").read_text().splitlines())]

    assert preds("cp") == preds("ref") and len(preds("ref")) == 2
    assert len({p for _, p in preds("ref")}) == 2  # the answers differ with the question and image
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("ref", "cp")]
    assert results[0]["scores"] == results[1]["scores"]
