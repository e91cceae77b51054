"""The stage files and DeepSpeed configs that ship with lvita, found by name from any directory.

Owns where the shipped files live and how a name given on the command line or in a stage file finds
one. The repository's ``stages/`` and ``ds_configs/`` are the only copies: ``lvita/_shipped/stages``
and ``lvita/_shipped/ds_configs`` are symbolic links to them, which a checkout follows and a wheel build
copies (``[tool.setuptools.package-data]``), so an installed lvita and a clone read the same files.

The rule for paths, one for every entry point:
- ``--stage X``: X is a stage file when one exists at X (relative to the working directory); else X
  names a shipped stage, ``demo/2_general``, with or without ``stages/`` in front and ``.json`` behind.
- Inside a stage file, relative paths (``output_dir``, ``data.root``, ``model.tokenizer``,
  ``model.init_from``, ...) resolve against the working directory, the directory the job runs in,
  never against the stage file's folder (a copied stage file keeps its meaning).
- ``deepspeed``: a file at that path when one exists; else the shipped config of that name
  (``ds_configs/zero3_bf16.json`` or ``zero3_bf16``), so the shipped stage files work from any directory.

Trade-off: symbolic links keep one copy of each file in git without a setup.py hook; a platform
without them (Windows checkouts) would see plain files and no shipped stages, which lvita does not target.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from lvita.errors import ConfigError, PathError

SHIPPED = Path(__file__).resolve().parents[1] / "_shipped"
STAGES = SHIPPED / "stages"
DS_CONFIGS = SHIPPED / "ds_configs"


def _bare(name: str, folder: str) -> str:
    """``stages/demo/2_general.json`` -> ``demo/2_general`` (the name relative to the shipped folder)."""
    name = name.strip().replace("\\", "/").removeprefix("./")
    name = name.removeprefix(f"{folder}/")
    return name.removesuffix(".json")


def stage_names() -> list[str]:
    """Every shipped stage file by name (``demo/1_align``, ..., ``longvita-14b/one-node/4_long_1m``)."""
    if not STAGES.is_dir():
        return []
    return sorted(str(p.relative_to(STAGES).with_suffix("")) for p in STAGES.rglob("*.json"))


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIGS.glob("*.json")) if DS_CONFIGS.is_dir() else []


def find_stage(given: str | Path) -> Path:
    """``--stage``: the file at ``given`` when there is one, else the shipped stage it names."""
    path = Path(given)
    if path.is_file():
        return path
    shipped = STAGES / f"{_bare(str(given), 'stages')}.json"
    if shipped.is_file():
        return shipped
    if path.exists():
        raise PathError(f"stage file {given}: is a directory, not a JSON file")
    hint = ", ".join(stage_names()) or "none are installed"
    raise PathError(f"stage file {given} not found (relative paths start at the working directory {Path.cwd()}); "
                    f"pass a stage JSON file or a shipped stage name ({hint}; `lvita stages` lists them)")


def find_ds_config(given: str) -> str:
    """``deepspeed``: the path as given when a file is there, else the shipped config it names (absolute),
    else the path as given (validation then reports it missing, naming the shipped ones)."""
    if Path(given).is_file():
        return given
    shipped = DS_CONFIGS / f"{_bare(given, 'ds_configs')}.json"
    return str(shipped) if shipped.is_file() else given


def describe(name: str) -> str:
    """A shipped stage's ``description`` (first sentence), for the listing."""
    try:
        text = json.loads((STAGES / f"{name}.json").read_text()).get("description", "")
    except (OSError, json.JSONDecodeError):
        return ""
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 110 else text[:107].rstrip() + "..."


def listing() -> str:
    """``lvita stages``: the shipped stage files and DeepSpeed configs, by the names the options accept."""
    names = stage_names()
    width = max((len(n) for n in names), default=0)
    lines = [f"Shipped stage files ({STAGES.resolve()}): pass the name to --stage, or copy one out with "
             f"`lvita stages copy NAME [DEST]` to edit it"]
    lines += [f"  {n:{width}s}  {describe(n)}" for n in names]
    lines.append(f"Shipped DeepSpeed configs (the stage key deepspeed accepts the name): "
                 f"{', '.join(ds_config_names())}")
    lines.append("Relative paths inside a stage file resolve against the working directory.")
    return "\n".join(lines)


def copy_out(name: str, dest: str | None = None) -> Path:
    """``lvita stages copy NAME [DEST]``: the shipped stage file (and nothing else) written to DEST (a file
    or an existing directory; default ``./<last part of NAME>.json``). Never overwrites."""
    source = STAGES / f"{_bare(name, 'stages')}.json"
    if not source.is_file():
        raise ConfigError(f"stages copy {name}: no shipped stage of that name; one of {', '.join(stage_names())}")
    target = Path(dest) if dest else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise PathError(f"stages copy: {target} exists; remove it or name another destination")
    if not target.parent.is_dir():
        raise PathError(f"stages copy: {target.parent} is not a directory")
    shutil.copyfile(source, target)
    return target


def add_stage_arguments(ap) -> None:
    """``--stage`` and ``--set``, worded once for every command that reads a stage file."""
    ap.add_argument("--stage", required=True, metavar="FILE|NAME",
                    help="a stage JSON file, or a shipped stage by name such as demo/2_general (`lvita stages` "
                         "lists them); relative paths inside it start at the working directory")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a stage key by its dotted path, e.g. train.iterations=10 (VALUE is read as JSON "
                         "when it parses, else as a string); repeat for several")
