"""Documented promises (docs/training.md, docs/stage_keys.md, docs/evaluation.md) of the command line and
stage keys that nothing else checks: ``lvita check --strict`` fails on paths that do not exist (and only
then), ``parallel.partition_method`` ``uniform`` and ``type:REGEX`` decide the pipeline stages (in ``lvita
check``'s table, and handed to DeepSpeed's PipelineModule), and ``lvita generate --messages`` answers a
multi-turn conversation from a JSON file."""
from __future__ import annotations

import json
import re

import pytest
import torch

from lvita.cli import main as cli
from tests.conftest import REPO, stage_dict, write_stage

STAGE_14B = str(REPO / "stages" / "longvita-14b" / "2_general.json")
DS_BF16 = f"deepspeed={REPO}/ds_configs/pipeline_bf16_zero1.json"


def test_check_strict_fails_only_on_missing_paths(capsys, tmp_path, tokenizer_dir, dataset_dir):
    args = ["check", "--stage", STAGE_14B, "--world-size", "64", "--set", DS_BF16]
    assert cli(args) == 0  # the 14B stage's data and tokenizer are not on this machine
    out = capsys.readouterr().out
    assert "to fill in before training" in out and "OK apart from the paths above" in out
    assert cli([*args, "--strict"]) == 2
    assert "to fill in before training" in capsys.readouterr().out
    # every path present: --strict passes
    stage = write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out"))
    assert cli(["check", "--stage", str(stage), "--world-size", "1", "--strict"]) == 0
    out = capsys.readouterr().out
    assert "to fill in" not in out and out.rstrip().endswith("OK")


def _stage_ranges(method: str, capsys) -> list[tuple[int, int]]:
    """The layer ranges of `lvita check`'s pipeline-stage table for the 14B stage at pipeline 8."""
    assert cli(["check", "--stage", STAGE_14B, "--world-size", "64", "--set", DS_BF16,
                "--set", "parallel.pipeline=8", "--set", f"parallel.partition_method={method}"]) == 0
    found = re.findall(r"pipeline stage (\d+): layers (\d+)-(\d+)", capsys.readouterr().out)
    assert [int(s) for s, _, _ in found] == list(range(8))
    return [(int(a), int(b)) for _, a, b in found]


def test_partition_methods_in_lvita_check(capsys):
    """50 blocks (embedding + vision, 48 decoder layers, head) over 8 stages."""
    uniform = _stage_ranges("uniform", capsys)
    assert uniform == [(0, 6), (7, 13), (14, 19), (20, 25), (26, 31), (32, 37), (38, 43), (44, 49)]  # 7,7,6,...
    decoders = _stage_ranges("type:DecoderLayer", capsys)
    assert [len(set(range(a, b + 1)) & set(range(1, 49))) for a, b in decoders] == [6] * 8
    params = _stage_ranges("parameters", capsys)  # the default counts the vision encoder on stage 0
    assert params[0][1] - params[0][0] < decoders[0][1] - decoders[0][0]
    assert len({tuple(uniform), tuple(decoders), tuple(params)}) == 3


def test_partition_method_reaches_the_pipeline_module(monkeypatch):
    """build_pipeline (what lvita.train calls with parallel.partition_method) hands the method to
    DeepSpeed's PipelineModule, whose partitioning lvita.parallel.pipeline.partition mirrors. Checked
    in this process: the PipelineModule's constructor is intercepted (building it needs a world of
    pipeline-degree processes)."""
    from lvita.parallel import pipeline

    seen = {}

    class Built(Exception):
        pass

    def record(self, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(pipeline.PipelineModule, "__init__", record)
    for method in ("uniform", "type:embed|head"):
        with pytest.raises(Built):
            pipeline.build_pipeline("tiny", 5, 0, 2, partition_method=method)
        assert seen["partition_method"] == method and seen["num_stages"] == 2
        assert [type(spec).__name__ for spec in seen["layers"]] == ["LayerSpec"] * 6
    assert [int(p) for p in pipeline.partition(pipeline.layer_specs("tiny", 5), 2, "type:embed|head")] == [0, 5, 6]


def test_generate_messages_answers_a_conversation(tmp_path, tokenizer_dir, capsys):
    from lvita.ckpt.hf import write_hf_dir
    from lvita.data.template import encode_conversation
    from lvita.data.tokenizer import load_tokenizer, special_token_ids
    from lvita.infer.decode import generate
    from lvita.model.longvita import LongVita

    t = load_tokenizer(tokenizer_dir)
    sp = special_token_ids(t)
    model = LongVita("tiny", sp["img_context"], seed=4).eval().requires_grad_(False)
    hf = write_hf_dir(model.state_dict(), "tiny", tokenizer_dir, tmp_path / "hf", sp["img_context"])
    messages = [{"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."},
                {"role": "user", "content": "And 4 + 4?"}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    ids = encode_conversation(messages, t, sp, None, [])[0] + [sp["im_start"]] + t.encode("assistant\n",
                                                                                           add_special_tokens=False)
    ref = generate(model, ids, torch.zeros(0, 3, 112, 112), sp, max_new_tokens=8)
    other = generate(model, ids[:-20] + ids[-6:], torch.zeros(0, 3, 112, 112), sp, max_new_tokens=8)
    assert ref.tokens != other.tokens  # the earlier turns change the answer: the check can fail
    capsys.readouterr()
    assert cli(["generate", "--model", str(hf), "--messages", str(tmp_path / "m.json"), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == t.decode(ref.tokens, skip_special_tokens=False).strip()
