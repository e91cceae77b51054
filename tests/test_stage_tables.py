"""The "Long-VITA 14B curriculum, setting by setting" tables of docs/curriculum.md against stages/longvita-14b/*.json.

Every table row's value must equal the stage file's value, every row must cite a source (and say why where
lvita deliberately differs), and every setting of the four files must have a row, so the tables and the files
cannot drift apart. Three table kinds are read, each recognised by its header row:

- per stage, "setting | value | source | why lvita differs": one dotted key per row (`train.lr.llm`);
- per stage, "data source | ratio | max_samples | per_file | source": one `data.sources[]` entry per row;
- once, "data source | paths | media_root | total | source": the files of each source, the same in all stages.

A value cell is one JSON value in backticks (`0.001`, `"file"`, `null`, `["a", "b"]`).

    python -m pytest -q tests/test_stage_tables.py

Markdown and JSON only (no model, no torch use). Trade-off: tables are found by their exact header rows and
stage headings, so a reworded header fails loudly ("no table") instead of being skipped.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = "docs/curriculum.md"  # where the tables live (the README links to it)
SECTION = "## The Long-VITA 14B curriculum, setting by setting"
SETTINGS = ("setting", "value", "source", "why lvita differs")
MIXTURE = ("data source", "ratio", "max_samples", "per_file", "source")
FILES = ("data source", "paths", "media_root", "total", "source")
SOURCE_KEYS = ("paths", "media_root", "total", "ratio", "max_samples", "per_file")  # per data.sources[] entry
NOT_SETTINGS = ("description",)  # prose, not a setting


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def cell_value(cell: str, where: str):
    m = re.fullmatch(r"`([^`]*)`", cell)
    if not m:
        raise ValueError(f"{where}: value {cell!r} is not one JSON value in backticks")
    return json.loads(m.group(1))


def read_tables(doc: Path) -> tuple[dict[str, dict[str, tuple]], dict[str, tuple], list[str]]:
    """-> ({stage file name: {dotted key: (value, source, why)}}, {dotted source key: (value, source, why)}
    for the shared files table, problems found while reading)."""
    text = doc.read_text()
    if SECTION not in text:
        return {}, {}, [f"{doc}: no section {SECTION!r}"]
    body = text.split(SECTION, 1)[1]
    body = re.split(r"\n#{1,2} ", body, maxsplit=1)[0]  # up to the next heading of level 1-2
    stages: dict[str, dict[str, tuple]] = {}
    shared: dict[str, tuple] = {}
    problems: list[str] = []
    target, header = None, None
    for n, line in enumerate(body.split("\n")):
        if line.startswith("### "):
            m = re.match(r"### Stage \d+: `([^`]+\.json)`", line)
            target = stages.setdefault(m.group(1), {}) if m else (shared if "all four stages" in line else None)
            header = None
            continue
        if not line.startswith("|"):
            header = None
            continue
        row = cells(line)
        if header is None:
            header = tuple(row)
            if header not in (SETTINGS, MIXTURE, FILES):
                problems.append(f"{DOC} table header {row} is none of the known kinds")
            elif target is None:
                problems.append(f"{DOC} table {row} is under no stage heading")
            continue
        if set("".join(row)) <= set("-: ") or header not in (SETTINGS, MIXTURE, FILES) or target is None:
            continue
        where = f"{DOC} {SECTION[3:]!r}, row {row[0]}"
        try:
            if header == SETTINGS:
                key = row[0].strip("`")
                entries = [(key, cell_value(row[1], where), row[2], row[3])]
            else:
                name = row[0].strip("`")
                entries = [(f"data.sources[{name}].{col}", cell_value(row[i], where), row[-1], "")
                           for i, col in enumerate(header[1:-1], 1)]
        except ValueError as e:
            problems.append(str(e))
            continue
        for key, value, source, why in entries:
            if key in target:
                problems.append(f"{where}: {key} appears twice")
            target[key] = (value, source, why)
    return stages, shared, problems


def stage_settings(cfg: dict) -> dict:
    """Every setting of a stage file as {dotted key: value}: nested objects flattened, lists whole, each
    data source's keys as data.sources[NAME].KEY (absent ones as null)."""
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    for key, value in cfg.items():
        if key in NOT_SETTINGS:
            continue
        if key == "data":
            for dk, dv in value.items():
                if dk != "sources":
                    walk(f"data.{dk}", dv)
            for src in value.get("sources", []):
                for sk in sorted(set(SOURCE_KEYS) | set(src) - {"name"}):
                    out[f"data.sources[{src['name']}].{sk}"] = src.get(sk)
        else:
            walk(key, value)
    return out


def same(a, b) -> bool:
    """JSON equality without Python's True == 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def drift(doc: Path, stage_dir: Path) -> list[str]:
    """Every disagreement between the curriculum tables and the stage files, one line each ([] when none)."""
    stages, shared, problems = read_tables(doc)
    files = sorted(stage_dir.glob("*.json"))
    if not files:
        problems.append(f"{stage_dir}: no stage files")
    for name in sorted(set(stages) - {f.name for f in files}):
        problems.append(f"{DOC} has a table for {name}, which is not in {stage_dir}")
    for table in [*stages.values(), shared]:
        for key, (_, source, why) in table.items():
            if not source:
                problems.append(f"{DOC} row {key}: no source")
            elif source.startswith("lvita") and not why:
                problems.append(f"{DOC} row {key}: lvita differs from the official value ({source}) but says not why")
    in_files: set[str] = set()
    for f in files:
        if f.name not in stages:
            problems.append(f"{f}: no {DOC} table (add '### Stage N: `{f.name}`' with its settings)")
            continue
        table = {**stages[f.name], **{k: v for k, v in shared.items() if k not in stages[f.name]}}
        settings = stage_settings(json.loads(f.read_text()))
        in_files |= set(settings)
        for key in sorted(set(settings) - set(table)):
            problems.append(f"{f.name}: {key} = {json.dumps(settings[key])} has no {DOC} row")
        for key in sorted(set(stages[f.name]) - set(settings)):
            problems.append(f"{DOC} row {key} of {f.name}: the file has no such setting")
        for key in sorted(set(settings) & set(table)):
            if not same(settings[key], table[key][0]):
                problems.append(f"{f.name}: {key} = {json.dumps(settings[key])}, {DOC} says {json.dumps(table[key][0])}")
    for key in sorted(set(shared) - in_files):
        problems.append(f"{DOC} source-files row {key}: no stage file has it")
    return problems


def test_curriculum_tables_equal_the_longvita_14b_stage_files():
    problems = drift(REPO / DOC, REPO / "stages" / "longvita-14b")
    assert problems == [], "\n".join(problems)


def test_tables_cover_what_the_issue_asks():
    """The tables are not trivially empty: all four stages, every source's caps, the stage-2 vision decay."""
    stages, shared, problems = read_tables(REPO / DOC)
    assert problems == []
    assert sorted(stages) == ["1_align.json", "2_general.json", "3_long_128k.json", "4_long_1m.json"]
    s1, s2, s4 = stages["1_align.json"], stages["2_general.json"], stages["4_long_1m.json"]
    assert s1["model.init_from"][0] == ["/path/to/InternViT-300M-448px", "/path/to/Qwen2.5-14B-Instruct"]
    assert s2["data.sources[OpenHermes-2.5].max_samples"][0] == 300000
    assert s2["train.vision_lr_decay.factor"][0] == 0.9 and s2["train.vision_lr_decay.scale"][0] == 0.1
    assert s4["data.same_source"][0] == "file" and s4["train.adam_betas"][0] == [0.9, 0.999]
    assert len(shared["data.sources[the-cauldron].paths"][0]) == 29
    assert len(shared["data.sources[LLaVA-OneVision].paths"][0]) == 65


def copy_repo_parts(tmp_path: Path) -> tuple[Path, Path]:
    doc = tmp_path / "curriculum.md"
    shutil.copy(REPO / DOC, doc)
    stage_dir = tmp_path / "longvita-14b"
    shutil.copytree(REPO / "stages" / "longvita-14b", stage_dir)
    return doc, stage_dir


def edit_stage(stage_dir: Path, name: str, edit) -> None:
    path = stage_dir / name
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=2))


def source(cfg: dict, name: str) -> dict:
    return next(s for s in cfg["data"]["sources"] if s["name"] == name)


def test_drift_is_caught_in_either_direction(tmp_path):
    doc, stage_dir = copy_repo_parts(tmp_path)
    assert drift(doc, stage_dir) == []
    # a value changed in a file
    edit_stage(stage_dir, "2_general.json", lambda c: c["train"].update(adam_betas=[0.9, 0.95]))
    # a cap changed (the shared files table and a mixture row are both checked)
    edit_stage(stage_dir, "3_long_128k.json", lambda c: source(c, "OpenHermes-2.5").update(max_samples=1))
    # a setting added to a file without a row, and one removed from a file with a row
    edit_stage(stage_dir, "4_long_1m.json", lambda c: (c["train"].update(optimizer_offload=True), c["data"].pop("min_tiles")))
    # a source's file list changed in one stage
    edit_stage(stage_dir, "1_align.json", lambda c: source(c, "the-cauldron")["paths"].pop())
    # true is not 1
    edit_stage(stage_dir, "2_general.json", lambda c: c["data"].update(reset_position_ids=1))
    found = drift(doc, stage_dir)
    cauldron = source(json.loads((REPO / "stages" / "longvita-14b" / "1_align.json").read_text()), "the-cauldron")["paths"]
    assert len(cauldron) == 29
    assert found == [
        f"1_align.json: data.sources[the-cauldron].paths = {json.dumps(cauldron[:-1])}, docs/curriculum.md says {json.dumps(cauldron)}",
        '2_general.json: data.reset_position_ids = 1, docs/curriculum.md says true',
        '2_general.json: train.adam_betas = [0.9, 0.95], docs/curriculum.md says [0.9, 0.999]',
        '3_long_128k.json: data.sources[OpenHermes-2.5].max_samples = 1, docs/curriculum.md says 300000',
        '4_long_1m.json: train.optimizer_offload = true has no docs/curriculum.md row',
        'docs/curriculum.md row data.min_tiles of 4_long_1m.json: the file has no such setting',
    ]


def test_rows_without_source_or_reason_are_caught(tmp_path):
    doc, stage_dir = copy_repo_parts(tmp_path)
    text = doc.read_text()
    seed_row = "| `seed` | `42` | `mg1.sh:209` (`--seed 42`) |  |"
    keep_row = next(line for line in text.split("\n") if line.startswith("| `train.keep_checkpoints` | `3` | lvita"))
    assert text.count(seed_row) == 1
    text = text.replace(seed_row, "| `seed` | `42` |  |  |")
    text = text.replace(keep_row, "| `train.keep_checkpoints` | `3` | lvita |  |")
    text = text.replace("| `data.video_fps` | `1.0` |", "| `data.video_fps` | 1.0 |", 1)
    doc.write_text(text)
    found = drift(doc, stage_dir)
    assert "docs/curriculum.md row seed: no source" in found
    assert "docs/curriculum.md row train.keep_checkpoints: lvita differs from the official value (lvita) but says not why" in found
    assert any("value '1.0' is not one JSON value in backticks" in p for p in found)
    assert "1_align.json: data.video_fps = 1.0 has no docs/curriculum.md row" in found  # the unreadable row counts as missing
