"""The input-format object: one tile-budget rule for training's planner and inference's build_prompt,
no crash when no smaller budget is left, and the model format named only where it is defined."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from PIL import Image

from lvita.config.schema import DataConfig
from lvita.data.input_format import InputFormat, InternVLInput, LongVitaInput, tile_budgets
from lvita.data.plan import Planner
from lvita.data.planned import ImageHeader, PlannedImage
from lvita.data.sources import Record
from lvita.data.template import SampleError
from lvita.infer.prompt import ContextError, MediaOptions, build_prompt
from lvita.model.formats import FORMAT_NAMES, INTERNVL, LONGVITA, model_format
from lvita.model.presets import spec_of

LVITA = Path(__file__).resolve().parents[1] / "lvita"


@pytest.fixture(scope="module", params=[INTERNVL, LONGVITA], ids=str)
def fmt(request, tokenizer_dir) -> InputFormat:
    return InputFormat.load(spec_of("tiny", request.param), tokenizer_dir)


def _images(root: Path, sizes) -> list[Path]:
    out = []
    for k, (w, h) in enumerate(sizes):
        p = root / f"im{k}_{w}x{h}.png"
        if not p.exists():
            Image.new("RGB", (w, h), (k * 40 % 256, 90, 160)).save(p)
        out.append(p)
    return out


def _record(root: Path, images: list[Path], answer: str = "A short answer.") -> Record:
    raw = {"id": "r", "images": [str(p) for p in images],
           "messages": [{"role": "user", "content": "<image>" * len(images) + "Compare them."},
                        {"role": "assistant", "content": answer}]}
    return Record("s", raw, "f:1", (0, 0, 0), root)


def test_budgets_halve_down_to_min_and_stop_there():
    assert tile_budgets(12, 1) == [12, 6, 3, 1]
    assert tile_budgets(4, 4) == [4]  # max == min: nothing smaller to try
    assert tile_budgets(5, 2) == [5, 2]
    assert InternVLInput.first_budget(None, 13, 1, 12) == 1 and InternVLInput.first_budget(None, 3, 2, 12) == 4
    assert LongVitaInput.first_budget(None, 13, 1, 12) == 12  # the released layout: every image max_tiles


@pytest.mark.parametrize("min_tiles, max_tiles, n_images", [(4, 4, 1), (2, 2, 3), (1, 12, 13), (1, 12, 20)])
def test_a_too_long_sample_is_a_counted_skip_when_no_smaller_budget_is_left(fmt, tmp_path, min_tiles, max_tiles,
                                                                            n_images):
    """Issue 29's crash: max_tiles == min_tiles (or internvl's share already at min_tiles with 12+ images) and
    the sample too long raised UnboundLocalError out of the planner; it must be too_long_multimodal."""
    images = _images(tmp_path, [(900, 450)] * n_images)
    cfg = DataConfig(seq_length=64, min_tiles=min_tiles, max_tiles=max_tiles, max_images=64, system_prompt="")
    with pytest.raises(SampleError) as e:
        Planner(cfg, fmt).plan(_record(tmp_path, images))
    assert e.value.reason == "too_long_multimodal" and f"at {min_tiles} tile(s)" in str(e.value)
    messages = [{"role": "user", "content": "<image>" * n_images + "Compare them."}]
    with pytest.raises(ContextError, match=f"even at {min_tiles} tile"):
        build_prompt(messages, fmt, images, system_prompt=None,
                     media=MediaOptions(min_tiles=min_tiles, max_tiles=max_tiles), max_context=64)


def test_fit_keeps_every_tile_when_the_sample_fits_and_halves_only_as_far_as_needed(fmt):
    headers = [ImageHeader(f"i{k}", 900, 450) for k in range(2)]
    messages = [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}]
    full = fmt.fit(messages, None, headers, 1, 12, 10 ** 6)
    assert full.fits and [m.max_tiles for m in full.media] == [fmt.first_budget(2, 1, 12)] * 2
    budgets = tile_budgets(fmt.first_budget(2, 1, 12), 1)
    lengths = [len(fmt.encode(messages, None, [fmt.plan_image(h, 1, b) for h in headers])[0]) for b in budgets]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    for n in lengths:  # a limit of exactly that length picks the largest budget that fits it
        at = fmt.fit(messages, None, headers, 1, 12, n)
        largest = next(b for b, m in zip(budgets, lengths) if m <= n)
        assert at.fits and len(at.ids) == n and {m.max_tiles for m in at.media} == {largest}
    assert not fmt.fit(messages, None, headers, 1, 12, lengths[-1] - 1).fits


def test_planner_and_build_prompt_choose_the_same_tiles_for_generated_samples(fmt, tmp_path):
    """One tile-budget implementation: for seeded image counts, sizes, tile settings and limits, the
    training plan's ids and planned media equal build_prompt's (whose prompt adds the open assistant turn)."""
    rng = random.Random(29)
    pool = _images(tmp_path, [(rng.randint(1, 1400), rng.randint(1, 1400)) for _ in range(12)] + [(8000, 3), (1, 1)])
    opening = fmt.opening()
    for _ in range(40):
        images = rng.sample(pool, rng.randint(1, 6))
        lo = rng.choice([1, 2, 4])
        hi = rng.choice([lo, lo + 1, 6, 12])
        limit = rng.choice([96, 200, 400, 1200, 5000])
        text = "<image>" * len(images) + "What differs?"
        cfg = DataConfig(seq_length=limit, min_tiles=lo, max_tiles=hi, max_images=64, system_prompt="")
        # the open assistant turn of a prompt and an empty answer's turn end alike: compare the user part
        rec = Record("s", {"id": "g", "images": [str(p) for p in images],
                           "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]},
                     "f:1", (0, 0, 0), tmp_path)
        try:
            plan = Planner(cfg, fmt).plan(rec)
        except SampleError as e:
            assert e.reason == "too_long_multimodal"
            plan = None
        answer_turn = len(plan.input_ids) - len(fmt.encode([{"role": "user", "content": text}], None, plan.media)[0]) \
            if plan else None
        try:
            # the prompt's limit leaves room for what the plan spends on the answer turn beyond the opening
            p = build_prompt([{"role": "user", "content": text}], fmt, images, system_prompt=None,
                             media=MediaOptions(min_tiles=lo, max_tiles=hi),
                             max_context=limit - (answer_turn - len(opening)) + 1 if plan else limit + 1)
        except ContextError:
            assert plan is None or answer_turn is None
            continue
        if plan is not None:
            assert [(str(m.ref), m.max_tiles, m.cols, m.rows) for m in p.media] == \
                [(str(m.ref), m.max_tiles, m.cols, m.rows) for m in plan.media]
            assert p.input_ids[:-len(opening)] == plan.input_ids[:len(p.input_ids) - len(opening)]
            assert sum(m.tiles for m in p.media) == p.pixel_values.shape[0]


def test_formats_are_objects_parsed_by_name_once():
    assert model_format("longvita") is LONGVITA and model_format(INTERNVL) is INTERNVL
    assert LONGVITA != "longvita" and str(LONGVITA) == "longvita" and FORMAT_NAMES == ("longvita", "internvl")
    with pytest.raises(ValueError, match='choose "longvita"'):
        model_format("qwen")
    assert spec_of("tiny", "longvita").format is LONGVITA and spec_of("tiny").format is INTERNVL
    assert isinstance(PlannedImage("a", 4, 2, 2).tiles, int) and PlannedImage("a", 4, 2, 2).tiles == 5


def test_the_format_names_appear_only_where_the_formats_are_defined():
    """Issue 29: a format is a type, not a string compared across the tree. The names may appear in the
    format's definition (lvita/model/formats.py) and in comments or docs; nowhere as a string literal."""
    literal = re.compile(r'''["'](longvita|internvl)["']''')
    found = []
    for path in LVITA.rglob("*.py"):
        if path == LVITA / "model" / "formats.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if literal.search(code) and not code.strip().startswith(('"""', "'''")):
                found.append(f"{path.relative_to(LVITA)}:{n}: {line.strip()}")
    assert not found, "model-format names as string literals:\n" + "\n".join(found)


def test_a_medium_repeated_in_a_sample_has_its_header_read_once(fmt, tmp_path, monkeypatch):
    """Headers are read once per file, in training's planner and in build_prompt (a rank reads only what
    it needs: the same image three times is one header read, not three)."""
    import lvita.data.plan as plan_mod
    import lvita.infer.prompt as prompt_mod

    image = _images(tmp_path, [(640, 480)])[0]
    for mod in (plan_mod, prompt_mod):
        calls = []
        real = mod.image_size
        monkeypatch.setattr(mod, "image_size", lambda p, real=real: calls.append(p) or real(p))
        if mod is plan_mod:
            plan = Planner(DataConfig(seq_length=4096, system_prompt=""), fmt).plan(_record(tmp_path, [image] * 3))
            assert len(plan.media) == 3
        else:
            p = build_prompt([{"role": "user", "content": "<image>" * 3 + "Same?"}], fmt, [image] * 3,
                             system_prompt=None)
            assert len(p.media) == 3
        assert len(calls) == 1, (mod.__name__, calls)
