"""The rule for paths (lvita.config.shipped): ``--stage`` takes a file or a shipped name, relative paths in a
stage file start at the working directory, ``deepspeed`` falls back to the shipped config of that name."""
from __future__ import annotations

import json

import pytest

from lvita.config import shipped
from lvita.config.schema import load_stage
from lvita.config.validate import validate
from lvita.errors import PathError
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["demo/2_general", "stages/demo/2_general.json", "demo/2_general.json",
                                  "./stages/demo/2_general"])
def test_a_shipped_stage_by_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_stage(name)
    assert cfg.name == "2_general"
    assert shipped.find_stage(name).read_bytes() == (REPO / "stages" / "demo" / "2_general.json").read_bytes()
    # its deepspeed key (ds_configs/pipeline_fp32_cpu.json) is not here: the shipped config of that name
    assert cfg.deepspeed == str(shipped.DS_CONFIGS / "pipeline_fp32_cpu.json")
    assert json.loads(open(cfg.deepspeed).read()) == json.loads((REPO / "ds_configs" / "pipeline_fp32_cpu.json").read_text())


def test_a_file_in_the_working_directory_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stages" / "demo").mkdir(parents=True)
    raw = json.loads((REPO / "stages" / "demo" / "2_general.json").read_text())
    (tmp_path / "stages" / "demo" / "2_general.json").write_text(json.dumps(dict(raw, name="mine")))
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "pipeline_fp32_cpu.json").write_text('{"zero_optimization": {"stage": 0}}')
    cfg = load_stage("stages/demo/2_general.json")
    assert cfg.name == "mine"
    assert cfg.deepspeed == "ds_configs/pipeline_fp32_cpu.json"  # the user's own copy, as written
    assert load_stage("demo/2_general").name == "2_general"  # no file at that path here: the shipped one


def test_relative_paths_in_a_stage_file_start_at_the_working_directory(tmp_path, monkeypatch, tokenizer_dir,
                                                                      dataset_dir):
    """A stage file in conf/ naming data/ and tok/: found from the job directory, never from conf/."""
    from tests.conftest import stage_dict, write_stage

    job = tmp_path / "job"
    (job / "conf").mkdir(parents=True)
    (job / "data").symlink_to(dataset_dir)
    (job / "tok").symlink_to(tokenizer_dir)
    cfg = stage_dict("tok", "data", "out")
    cfg["deepspeed"] = "pipeline_fp32_cpu"  # a shipped config by its bare name
    write_stage(job / "conf" / "s.json", cfg)
    monkeypatch.chdir(job)
    assert validate(load_stage("conf/s.json"), 1).missing == []  # (errors raise)
    monkeypatch.chdir(job / "conf")  # from the stage file's own folder, data/ and tok/ are not there
    missing = validate(load_stage("s.json"), 1).missing
    assert any("model.tokenizer: tok" in m for m in missing) and any("data" in m for m in missing), missing


def test_unknown_stage_names_list_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PathError, match=r"stage file demo/9_nope not found .*\(demo/1_align, demo/2_general"):
        load_stage("demo/9_nope")
    (tmp_path / "adir").mkdir()
    with pytest.raises(PathError, match="is a directory"):
        load_stage("adir")
    assert "longvita-14b/one-node/4_long_1m" in shipped.stage_names()
    assert set(shipped.ds_config_names()) == {p.stem for p in (REPO / "ds_configs").glob("*.json")}


def test_stages_copy_writes_the_shipped_file_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = shipped.copy_out("longvita-14b/2_general")
    assert out.resolve() == (tmp_path / "2_general.json").resolve()
    assert out.read_bytes() == (REPO / "stages" / "longvita-14b" / "2_general.json").read_bytes()
    with pytest.raises(PathError, match="exists"):
        shipped.copy_out("longvita-14b/2_general")
    (tmp_path / "d").mkdir()
    shipped.copy_out("demo/1_align", "d")
    assert (tmp_path / "d" / "1_align.json").read_bytes() == (REPO / "stages" / "demo" / "1_align.json").read_bytes()
