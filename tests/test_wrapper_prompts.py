"""Benchmark prompts, answer lengths, frame limits and answer clean-up against Long-VITA's two wrappers.

``tests/fixtures/longvita_wrappers/wrapper_fixtures.json`` holds what VLMEvalKit 37d08c5's dataset classes
and Long-VITA's wrappers (``VLMEvalKit/long_vita_hf.py``: HF; ``VLMEvalKit/long_vita.py``: server) built for
the items ``inputs.py`` writes (``make_wrapper_fixtures.py`` there: versions, stubs, how to rerun). This test
writes the same files, reads them with lvita's loaders and compares, per benchmark and wrapper: the user's
text exactly; under HF, lvita's prompt ids (``build_prompt``, longvita input format, no system prompt, the
wrapper's frame limits) with the ids the HF wrapper fed its model; and the settings each wrapper used.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from lvita.evaluation.items import LoadOptions
from lvita.evaluation.prompts import postprocess
from lvita.evaluation.video import VIDEO_BENCHMARKS
from lvita.evaluation.vlmevalkit import BENCHMARKS as IMAGE_BENCHMARKS
from lvita.evaluation.wrappers import HF, SERVER, WRAPPERS, wrapper_named
from lvita.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "longvita_wrappers"
_spec = importlib.util.spec_from_file_location("longvita_wrapper_inputs", FIXTURES / "inputs.py")
inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inputs)

FIX = json.loads((FIXTURES / "wrapper_fixtures.json").read_text())
CASES = list(FIX["items"])  # the 10 benchmarks, Video-MME twice (without and with subtitles)


def _unruns(runs) -> list[int]:
    return [t for t, n in runs for _ in range(n)]


def bench_of(case: str):
    name = case.replace("-subtitles", "")
    return IMAGE_BENCHMARKS.get(name) or VIDEO_BENCHMARKS[name]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrappers")
    return root, inputs.write_all(root)


def lvita_items(case: str, written, wrapper=HF) -> list:
    root, files = written
    bench = bench_of(case)
    opts = LoadOptions(work=root / "work" / case, frames=wrapper.max_frames, fps=wrapper.max_fps,
                       subtitles=case.endswith("-subtitles"))
    items = list(bench.load(files[bench.name], opts))
    assert all(hasattr(i, "question") for i in items), [i for i in items if not hasattr(i, "question")]
    assert len(items) == len(FIX["items"][case])
    return items


@pytest.fixture(scope="module")
def fmt(tokenizer_dir):
    from lvita.data.input_format import InputFormat
    from lvita.model.presets import spec_of

    return InputFormat.load(spec_of("longvita-14b"), tokenizer_dir)  # 448 px tiles, 256 tokens a tile


def test_the_fixture_tokenizer_is_the_one_the_tests_build(fmt):
    items = sorted(fmt.tok.get_vocab().items(), key=lambda kv: kv[1])
    assert hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest() == \
        FIX["vocab_fingerprint"], ("the demo tokenizer changed since the fixtures were made: rerun "
                                   "tests/fixtures/longvita_wrappers/make_wrapper_fixtures.py")


@pytest.mark.parametrize("wrapper", list(WRAPPERS.values()), ids=list(WRAPPERS))
@pytest.mark.parametrize("case", CASES)
def test_prompt_text_is_the_wrappers(case, wrapper, written, fmt):
    bench = bench_of(case)
    for item, want in zip(lvita_items(case, written, wrapper), FIX["items"][case]):
        assert bench.prompt(item, fmt, wrapper) == want[wrapper.name]["text"], (case, item.id)


def test_the_wrappers_differ_where_the_fixtures_say(written, fmt):
    """MVBench and MLVU differ (system text; MLVU's dataset type), every other benchmark is one text."""
    differ = {c for c in CASES if any(i["hf"]["text"] != i["server"]["text"] for i in FIX["items"][c])}
    assert differ == {"MVBench", "MLVU"}
    assert all(i["server"]["system_prompt"] for c in differ for i in FIX["items"][c])  # held, never sent
    assert FIX["dataset_type"]["MLVU"] == {"hf": "Video-MCQ", "server": "MCQ"}
    assert HF.dataset_type("MLVU", "Video-MCQ") == "Video-MCQ" and SERVER.dataset_type("MLVU", "Video-MCQ") == "MCQ"
    assert HF.system_text and not SERVER.system_text


@pytest.mark.parametrize("case", CASES)
def test_prompt_ids_are_the_hf_wrappers(case, written, fmt):
    from lvita.infer.prompt import MediaOptions, build_prompt

    bench = bench_of(case)
    media = MediaOptions(min_tiles=1, max_tiles=12, max_frames=HF.max_frames, video_fps=HF.max_fps)
    for item, want in zip(lvita_items(case, written), FIX["items"][case]):
        text = bench.prompt(item, fmt, HF)
        prompt = build_prompt([{"role": "user", "content": text}], fmt, item.images, item.videos,
                              system_prompt=None, media=media)
        assert want["hf"]["roles"] == ["user"]
        assert prompt.input_ids == _unruns(want["hf"]["ids"]), (case, item.id)
        assert prompt.pixel_values.shape[0] == want["hf"]["tiles"], (case, item.id)


def test_answer_lengths_and_frame_limits_are_the_wrappers():
    hf, server = FIX["hf_settings"], FIX["server_settings"]
    assert hf["default_params"]["max_new_tokens"] == hf["generation_config_max_new_tokens"] == 1024
    assert not hf["default_params"]["do_sample"]
    for case in CASES:
        bench = bench_of(case)
        assert HF.max_new_tokens(bench) == hf["default_params"]["max_new_tokens"], case
        assert SERVER.max_new_tokens(bench) == server["default_params"]["tokens_to_generate"], case
        for item in FIX["items"][case]:
            assert item["hf"]["params"]["max_new_tokens"] == HF.max_new_tokens(bench)
            assert item["server"]["payload"]["tokens_to_generate"] == SERVER.max_new_tokens(bench)
            assert "max_num_frame" not in item["server"]["payload"]  # MAX_NUM_FRAME unset: the server's own
    assert (HF.max_frames, HF.max_fps) == (hf["max_num_frame"], hf["max_fps"])
    # the server's frame limits are its launch script's (--max-num-frame 4096 --max-fps 1), not in the fixture
    assert (SERVER.max_frames, SERVER.max_fps) == (4096, 1)


def test_answer_clean_up_is_the_wrappers():
    from lvita.data.input_format import InternVLInput, LongVitaInput

    reply = FIX["reply"]
    for case in CASES:
        for item in FIX["items"][case]:
            assert postprocess(reply, LongVitaInput, HF) == item["hf"]["answer"] == reply
            assert postprocess(reply, LongVitaInput, SERVER) == item["server"]["answer"] == "B"
    assert postprocess(reply, LongVitaInput) == reply  # HF is the default
    assert postprocess(reply, InternVLInput, SERVER) == reply


def test_wrapper_named():
    assert wrapper_named("hf") is HF and wrapper_named("server") is SERVER
    with pytest.raises(UserError, match="expected one of hf, server"):
        wrapper_named("megatron")
