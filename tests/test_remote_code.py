"""Exports that load like the released checkpoints (issue 32, point 2).

``lvita convert to-hf --format longvita`` writes, beside the weights, lvita's own modelling code for
``model_type: long_vita`` (``lvita/ckpt/remote_code/``) and ``auto_map`` in config.json, so the
directory loads as the official inference script and VLMEvalKit's ``long_vita_hf.py`` load released
checkpoints: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, then
``generate(inputs=ids, images=..., image_indices=...)``.

Checked here against the official model's own numbers (``tests/fixtures/longvita_official``: the
tiny released-layout model's logits and greedy tokens, made with the official code): an export of
an lvita checkpoint holding the fixture weights, loaded through transformers' remote-code path
(``tests/remote_code_run.py``, a subprocess: the export must stand alone, no lvita import) in the
suite's transformers and in transformers 4.49 (the official pin; a side environment named by
LVITA_TRANSFORMERS_449_PYTHON, default /work/side/wrap-venv/bin/python; skipped where none exists);
an export after a few training steps against lvita's own logits of that checkpoint; config.json
field by field against the official configs (the fixture recipe's at toy size, and the official
``config_14B.json``, kept as ``fixtures/longvita_official/config_14B.json``, for ``longvita-14b``).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, stage_dict, write_stage
from tests.test_longvita_official import EXPECTED, FIXTURES, _all_logits, recipe, write_released_fixture

RUNNER = REPO / "tests" / "remote_code_run.py"
CODE = REPO / "lvita" / "ckpt" / "remote_code"
DEFAULT_449 = Path("/work/side/wrap-venv/bin/python")
AUTO_MAP = {"AutoConfig": "configuration_long_vita.LongVITAConfig", "AutoModel": "modeling_long_vita.LongVITAModel",
            "AutoModelForCausalLM": "modeling_long_vita.LongVITAForCausalLM"}
# Tolerance 1e-5 on fp32 logits of magnitude ~1-4, as tests/test_longvita_official.py: the noise floor is
# two implementations of the same float32 maths (fused qkv, SDPA vs eager, summation order) against
# the official numbers recorded to 8 digits: measured 1.4e-6 at most, in transformers 5.25 and 4.49
# alike. Bug signal, measured by breaking the exported code: pixel shuffle without its final transpose
# 3.6, the CLS token kept instead of dropped 5.2, blank pixels 5.6; a q/k/v third swapped, wrong rope
# theta or RMSNorm eps move logits by 1e-2 to 1 (test_longvita_official.py). Below it: the
# projector LayerNorm's eps 1e-6 instead of torch's default 1e-5 moves them by only 6.9e-6.
ATOL = 1e-5


def _python_449() -> str | None:
    """A python with transformers 4.49 (LVITA_TRANSFORMERS_449_PYTHON, else the side venv), or None."""
    exe = os.environ.get("LVITA_TRANSFORMERS_449_PYTHON") or (str(DEFAULT_449) if DEFAULT_449.is_file() else None)
    if not exe:
        return None
    probe = subprocess.run([exe, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, timeout=120)
    return exe if probe.returncode == 0 and probe.stdout.strip().startswith("4.49") else None


def load_remote(python: str, export: Path, cache: Path, attn: str = "eager") -> dict:
    """Run tests/remote_code_run.py on ``export`` with ``python``; its JSON."""
    env = dict(os.environ, PYTHONPATH="")  # nothing of lvita's on the path: the export must stand alone
    res = subprocess.run([python, str(RUNNER), str(export), "--modules-cache", str(cache), "--attn", attn],
                         capture_output=True, text=True, timeout=600, env=env, cwd=str(cache.parent))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The fixture weights as an lvita checkpoint (from-hf of the released layout), exported with to-hf."""
    from lvita.ckpt.convert import from_hf, to_hf

    root = tmp_path_factory.mktemp("remote")
    lvita_dir = from_hf([str(write_released_fixture(root / "released"))], str(root / "lvita"), log=lambda *a: None)
    return to_hf(str(lvita_dir), str(root / "Long-VITA-tiny-export"), fmt="longvita", log=lambda *a: None)


def _assert_official(got: dict) -> None:
    assert got["class"] == "LongVITAForCausalLM" and got["config_class"] == "LongVITAConfig"
    assert got["module"].startswith("transformers_modules.")  # the export's own code, not an installed package
    torch.testing.assert_close(torch.tensor(got["logits_at_ids"]), torch.tensor(EXPECTED["logits_at_ids"]),
                               rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.tensor(got["logsumexp"]), torch.tensor(EXPECTED["logsumexp"]), rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.tensor(got["last_row"]), torch.tensor(EXPECTED["last_row"]), rtol=0, atol=ATOL)
    assert got["argmax"] == EXPECTED["argmax"]
    assert got["blank_max_diff"] > 100 * ATOL  # the pixels reach the logits through images/image_indices
    # greedy decoding as the official code did it (full forward each step), with and without the KV cache
    assert got["greedy_cache"] == got["greedy_no_cache"] == EXPECTED["greedy_tokens"]
    # generate(images=..., image_indices=...): images merged at the prefill only (cache) or at every step
    assert got["mm_generate_cache"] == got["mm_generate_no_cache"]
    assert got["mm_generate_cache"][0] == EXPECTED["argmax"][-1]


def test_export_carries_self_contained_code_named_by_auto_map(exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["auto_map"] == AUTO_MAP
    assert cfg["visual"]["auto_map"] == {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                                         "AutoModel": "modeling_intern_vit.InternVisionModel"}
    shipped = sorted(p.name for p in CODE.glob("*.py"))
    assert shipped == ["configuration_intern_vit.py", "configuration_long_vita.py", "modeling_intern_vit.py",
                       "modeling_long_vita.py"]
    for name in shipped:
        assert (exported / name).read_bytes() == (CODE / name).read_bytes(), name
        tree = ast.parse((CODE / name).read_text())
        assert "owns" in (ast.get_docstring(tree) or "").lower(), name
        assert len((CODE / name).read_text().splitlines()) <= 400, name
        tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        tops |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert tops <= {"torch", "transformers", "inspect", "__future__"}, (name, tops)  # never lvita
    package_data = (REPO / "pyproject.toml").read_text()
    assert '"lvita.ckpt" = ["remote_code/*.py"]' in package_data  # installed with the package, not just the repo


def test_lvita_reads_the_exports_tokenizer_without_asking_to_run_its_code(exported, monkeypatch):
    """The export's config.json names its modelling code (auto_map): transformers' AutoTokenizer, left to decide,
    asks "Do you wish to run the custom code? [y/N]" on the terminal (input(), 15 s), so `lvita generate --model
    <export>` and the demo waited on the user. lvita's tokenizer loader never runs a directory's code."""
    import builtins

    from lvita.data.tokenizer import load_tokenizer
    from lvita.model.formats import LONGVITA

    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "n")
    tok = load_tokenizer(exported, LONGVITA)
    assert not asked, asked[0][0][:200]
    assert len(tok) > 0


def test_export_loads_with_trust_remote_code_and_gives_the_official_numbers(exported, tmp_path):
    _assert_official(load_remote(sys.executable, exported, tmp_path / "modules"))


def test_export_loads_in_transformers_449(exported, tmp_path):
    python = _python_449()
    if python is None:
        pytest.skip("no python with transformers 4.49 (set LVITA_TRANSFORMERS_449_PYTHON to one)")
    got = load_remote(python, exported, tmp_path / "modules")
    assert got["transformers"].startswith("4.49")
    _assert_official(got)


def test_config_equals_the_official_one_field_by_field(exported):
    cfg = json.loads((exported / "config.json").read_text())
    # the recipe's CONFIG is the official config at toy size, except two choices of the fixture for a
    # CPU run that a released config has the other way (config_14B.json: use_cache and use_flash_attn true)
    want = dict(recipe.CONFIG, use_cache=True, visual=dict(recipe.VISUAL, use_flash_attn=True))
    assert {k: v for k, v in cfg.items() if k not in ("auto_map", "visual")} == {
        k: v for k, v in want.items() if k != "visual"}
    assert {k: v for k, v in cfg["visual"].items() if k not in ("auto_map", "torch_dtype")} == want["visual"]
    assert cfg["visual"]["torch_dtype"] == cfg["torch_dtype"] == "float32"


def test_longvita_14b_config_equals_config_14b_json():
    from lvita.ckpt.released import released_config
    from lvita.model.presets import llm_config

    official = json.loads((FIXTURES / "config_14B.json").read_text())
    # Qwen2.5's <|endoftext|> and <|im_end|>: what the export writes from the run's tokenizer
    ours = released_config("longvita-14b", {"endoftext": 151643, "im_end": 151645}, "bfloat16")
    # transformers_version: which transformers wrote the file; auto_map: config_14B.json is the repository's
    # template (its package registers the classes at import), a released directory's config.json has it
    drop = lambda d, *ks: {k: v for k, v in d.items() if k not in ks}  # noqa: E731
    assert drop(ours, "visual", "auto_map") == drop(official, "visual", "transformers_version")
    assert ours["visual"] == drop(official["visual"], "transformers_version")
    assert llm_config("longvita-14b").max_position_embeddings == official["max_position_embeddings"] == 1_310_720


def _train(rank, cfg_path, overrides):
    from lvita.config.schema import load_stage
    from lvita.training.loop import run

    return run(load_stage(cfg_path, overrides))


def test_a_fine_tuned_export_gives_lvitas_logits(exported, dataset_dir, tmp_path):
    """Two training steps from the fixture weights, exported: the remote code (SDPA attention here)
    computes what lvita computes for that checkpoint, and no longer the official numbers."""
    from lvita.ckpt.checkpoint import locate
    from lvita.ckpt.convert import to_hf
    from lvita.infer.generate import load_model
    from tests.distributed import run_world

    released = exported.parent / "released"
    cfg = stage_dict(released, dataset_dir, tmp_path / "run")
    cfg["model"].update(preset=str(released), init_from=str(released))
    cfg["train"].update(iterations=2, global_batch=2, lr={"vision": 1e-3, "projector": 1e-3, "llm": 1e-3})
    run_world(_train, 1, str(write_stage(tmp_path / "s.json", cfg)), [])
    out = to_hf(str(locate(tmp_path / "run", "test").tag_dir), str(tmp_path / "tuned"), fmt="longvita",
                log=lambda *a: None)
    got = load_remote(sys.executable, out, tmp_path / "modules", attn="sdpa")
    ids, _, n = recipe.multimodal_input()
    ours = _all_logits(load_model(out)[0], ids, recipe.pixel_values(n))
    torch.testing.assert_close(torch.tensor(got["logits_at_ids"]), ours[:, EXPECTED["logit_ids"]], rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.tensor(got["logsumexp"]), torch.logsumexp(ours, -1), rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.tensor(got["last_row"]), ours[-1], rtol=0, atol=ATOL)
    moved = (torch.tensor(got["logits_at_ids"]) - torch.tensor(EXPECTED["logits_at_ids"])).abs().max()
    assert moved > 100 * ATOL, f"training moved the logits by only {moved}"  # the test sees the tuned weights


def test_a_14b_checkpoint_saved_with_the_old_positions_still_fits(tmp_path):
    """longvita-14b's max_position_embeddings moved 1,048,576 -> 1,310,720 (and max_window_layers 70 came
    in): neither decides a tensor, so checkpoints saved before still resume; a shape change is refused."""
    from lvita.ckpt.checkpoint import CheckpointError, Found, check_fits, model_info
    from lvita.model.presets import spec_of

    info = model_info(spec_of("longvita-14b"))
    llm = {k: v for k, v in info["model"]["llm"].items() if k != "max_window_layers"}
    old = dict(info, model={"vision": info["model"]["vision"], "llm": dict(llm, max_position_embeddings=1 << 20)})
    check_fits(Found(tmp_path, old), "model.init_from", "longvita-14b", {})
    wider = dict(old, model={"vision": old["model"]["vision"], "llm": dict(old["model"]["llm"], hidden_size=5121)})
    with pytest.raises(CheckpointError, match="saved for model.preset='longvita-14b'"):
        check_fits(Found(tmp_path, wider), "model.init_from", "longvita-14b", {})
