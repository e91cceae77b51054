"""Checkpoints on disk: crash-safe saving, finding the newest complete one, and checking it.

Owns the layout of ``<output_dir>/checkpoints``::

    checkpoints/global_step<N>/      DeepSpeed's files (layer_XX-model_states.pt: one per model block,
                                     the same at every layout and engine: the ZeRO-2/3 engine gathers
                                     and writes them itself; mp_rank_XX_model_states.pt and
                                     zero_pp_rank_*_optim_states.pt: per pipeline stage / ZeRO rank)
                                     + rng_rank<R>.pt (each rank's RNG states)
                                     + lvita_manifest.json (written last: the checkpoint is complete)
    checkpoints/latest               the newest complete tag (replaced atomically)
    checkpoints/universal/<tag>/     DeepSpeed universal copy, made on demand (lvita.ckpt.resume)

A checkpoint counts only once its manifest exists; the manifest lists every file with its size, the
parallel layout, the model (preset, ``model.format`` and shapes), the precision and a fingerprint of
the tokenizer, so a missing shard, a truncated file or a resume with another model, format or
vocabulary is a clear error before
anything is loaded or overwritten. Files are written, then renamed into place, so a SIGKILL at any
moment leaves either the old or the new state. ``train.keep_checkpoints`` prunes older tags only
after a newer one is complete, and never the newest *healthy* one (saved from finite weights after
a finite step; lvita.training.guard): a run that stops learning cannot prune away its last sound state.

Trade-off: DeepSpeed writes ``latest`` before its final barrier (not crash-safe), so we save with
``save_latest=False`` and point ``latest`` ourselves after the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lvita.model.formats import INTERNVL
from lvita.errors import UserError

MANIFEST = "lvita_manifest.json"
FORMAT = 1
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(UserError):
    """A checkpoint or model directory is missing, incomplete, damaged or does not fit the run; the
    message says which file and what to do."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# Added by HF exports for InternVL's processor (lvita.ckpt.hf); a text placeholder lvita never feeds the
# model as a token, so a tokenizer that gained it still means the same ids.
NOT_FINGERPRINTED = {"<video>"}


@contextmanager
def staged_dir(out: Path):
    """Yield a fresh temporary sibling of ``out`` to fill; on success it is renamed to ``out`` (which
    must be absent or empty), on any error removed: ``out`` is never half-written."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenizer_fingerprint(tok) -> dict:
    """Size and hash of the vocabulary (token -> id), so a checkpoint knows what its ids mean."""
    items = sorted(((t, i) for t, i in tok.get_vocab().items() if t not in NOT_FINGERPRINTED), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"size": len(items), "sha256": digest}


# -- RNG ------------------------------------------------------------------------------------------

def rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- saving ---------------------------------------------------------------------------------------

def save(engine, output_dir: str | Path, step: int, data_state: dict, config: dict, info: dict,
         keep: int = 0, log=lambda *a: None, guard: dict | None = None, write_blocks=None) -> Path:
    """Collective: every rank calls it. ``info`` (layout, preset, precision, tokenizer, zero stage)
    goes into the manifest. ``guard``: lvita.training.guard's counters (``streak`` > 0: saved during a run of
    non-finite steps, so not :func:`healthy`). The caller checks the weights are finite first
    (lvita.training.loop refuses to save weights that are not). ``write_blocks(engine, tag_dir)``: collective,
    writes the per-block weight files where the engine does not (the ZeRO engine, lvita.parallel.zero).
    Returns the tag directory."""
    import torch.distributed as dist

    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    rank = dist.get_rank()
    ckpt_dir = Path(output_dir) / "checkpoints"
    tag = tag_for(step)
    guard = guard or {}
    tag_dir = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a partial save of this step from a killed run, or an old one: replace it
            (tag_dir / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(tag_dir)
        tag_dir.mkdir()
    dist.barrier()
    torch.save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    client = {
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        "lvita": {"step": step, "data": data_state, "config": config, "guard": guard},
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)  # ends in a barrier
    if write_blocks is not None:
        write_blocks(engine, tag_dir)
    if os.environ.get("LVITA_FAULT_KILL_BEFORE_MANIFEST") == tag:  # fault injection for the crash tests
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "tag": tag, "step": step, **info, "weights_finite": True,
                    "nonfinite_streak": int(guard.get("streak", 0)), "files": files}
        atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write(ckpt_dir / "latest", tag)
        if keep:
            spare = last_healthy(ckpt_dir)  # never pruned: the newest checkpoint saved while training was sound
            for old in complete_tags(ckpt_dir)[:-keep]:
                if old == spare:
                    continue
                remove_tag(ckpt_dir, old)
                log(f"[checkpoint] removed {ckpt_dir / old} (train.keep_checkpoints={keep})")
    dist.barrier()
    return tag_dir


def healthy(manifest: dict) -> bool:
    """Saved from finite weights after a finite step (manifests from before the guard count too)."""
    return manifest.get("weights_finite", True) and not manifest.get("nonfinite_streak", 0)


def last_healthy(ckpt_dir: Path) -> str | None:
    """The newest complete tag that is :func:`healthy`, or None."""
    for tag in reversed(complete_tags(ckpt_dir)):
        try:
            if healthy(json.loads((ckpt_dir / tag / MANIFEST).read_text())):
                return tag
        except (OSError, json.JSONDecodeError):
            continue
    return None


def remove_tag(ckpt_dir: Path, tag: str) -> None:
    """Delete a tag: the manifest first, so a kill half-way leaves an incomplete (ignored) tag."""
    (ckpt_dir / tag / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    shutil.rmtree(ckpt_dir / "universal" / tag, ignore_errors=True)


# -- finding and checking -------------------------------------------------------------------------

def _step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def complete_tags(ckpt_dir: Path, complete: bool = True) -> list[str]:
    """Tags with a manifest (``complete=False``: those without), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / MANIFEST).is_file() == complete]
    return sorted(tags, key=_step_of)


def read_manifest(tag_dir: Path, what: str = "checkpoint") -> dict:
    """The manifest of a complete checkpoint after checking every file it lists."""
    path = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        raise CheckpointError(f"{what} {tag_dir}: no such directory")
    if not path.is_file():
        raise CheckpointError(f"{what} {tag_dir}: incomplete (no {MANIFEST}; the run stopped while saving "
                              f"it); use an earlier checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    for name, size in manifest["files"].items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"{what} {tag_dir}: missing file {name} (listed in {MANIFEST}); the checkpoint "
                                  f"is damaged: restore the file or use an earlier checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(f"{what} {tag_dir}: {name} is {f.stat().st_size} bytes but was saved with {size} "
                                  f"(truncated or overwritten); restore it or use an earlier checkpoint")
    return manifest


@dataclass
class Found:
    tag_dir: Path
    manifest: dict

    @property
    def ckpt_dir(self) -> Path:
        return self.tag_dir.parent

    @property
    def tag(self) -> str:
        return self.tag_dir.name


def locate(path: str | Path, what: str) -> Found:
    """``.../checkpoints`` (its newest complete tag) or ``.../checkpoints/<tag>`` -> a checked checkpoint.
    ``what`` names the setting in errors (``resume``, ``model.init_from``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what}={path}: no such file or directory")
    if _TAG.match(path.name) or (path / MANIFEST).is_file():
        return Found(path, read_manifest(path, f"{what}={path}:"))
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    tags = complete_tags(path)
    if not tags:
        partial = complete_tags(path, complete=False)
        raise CheckpointError(f"{what}={path}: no complete checkpoint there"
                              + (f" (incomplete: {', '.join(partial)})" if partial else "")
                              + "; point it at an output_dir, its checkpoints/ directory or one global_step<N> in it")
    return Found(path / tags[-1], read_manifest(path / tags[-1], f"{what}={path}:"))


def saved_system_prompt(manifest: dict) -> str | None:
    """The system prompt the checkpoint's stage trained with (``data.system_prompt``; None: none);
    checkpoints saved before lvita recorded it trained with the default."""
    from lvita.config.schema import DataConfig

    return manifest.get("system_prompt", DataConfig.system_prompt) or None


def model_info(spec) -> dict:
    """What a manifest records of the model: ``preset`` (its name or directory), ``format`` and the
    shapes (``model``: vision / llm keyword arguments), so a later run can check it fits."""
    from lvita.model.presets import spec_of

    spec = spec_of(spec)
    return {"preset": spec.name, "format": spec.format.name, "model": {"vision": spec.vision, "llm": spec.llm}}


def manifest_spec(manifest: dict, where):
    """The model description a checkpoint was saved for (manifests before ``format``: InternVL's)."""
    from lvita.model.presets import ModelSpec, spec_of

    if "model" in manifest:
        return ModelSpec.make(manifest.get("preset", "?"), manifest.get("format", INTERNVL.name),
                              manifest["model"]["vision"], manifest["model"]["llm"])
    try:
        return spec_of(manifest.get("preset"), manifest.get("format", INTERNVL.name))
    except ValueError as e:
        raise CheckpointError(f"{where}: its manifest names no model lvita knows ({e})") from None


def check_fits(found: Found, what: str, preset, tokenizer: dict, precision: str | None = None) -> None:
    """The checkpoint was made for this model (shapes and format) and vocabulary (and precision, for a
    resume). ``preset``: the model's description (ModelSpec) or a preset name. Manifests from before
    lvita recorded ``format`` are InternVL-format (the only projector lvita had)."""
    from lvita.model.presets import NOT_SHAPES, spec_of

    spec = spec_of(preset)
    m, where = found.manifest, f"{what}={found.tag_dir}"
    shapes = lambda v, llm: {"vision": v, "llm": {k: x for k, x in llm.items() if k not in NOT_SHAPES}}  # noqa: E731
    same_shapes = (shapes(m["model"]["vision"], m["model"]["llm"]) == shapes(spec.vision, spec.llm) if "model" in m
                   else m.get("preset") == spec.name)
    if not same_shapes:
        raise CheckpointError(f"{where}: saved for model.preset={m.get('preset')!r} but this stage has "
                              f"model.preset={spec.name!r}; set model.preset={m.get('preset')!r} or use another checkpoint")
    saved_format = m.get("format", INTERNVL.name)
    if saved_format != spec.format.name:
        raise CheckpointError(f"{where}: saved in model.format={saved_format!r} but this stage has model.format="
                              f"'{spec.format}'; the formats' projectors (and input layouts) differ, so {what} across "
                              f"formats is refused. Set model.format={saved_format!r}, or start the other format from "
                              f"the vision and language weights alone (model.init_from=[InternViT dir, Qwen2 dir])")
    saved = m.get("tokenizer") or {}
    if saved and saved != tokenizer:
        raise CheckpointError(f"{where}: tokenizer vocabulary differs: the checkpoint was trained with "
                              f"{saved['size']} tokens (hash {saved['sha256']}), model.tokenizer has {tokenizer['size']} "
                              f"(hash {tokenizer['sha256']}); token ids would mean other words. Use the stage's "
                              f"tokenizer (saved in its config: {m.get('tokenizer_path')})")
    if precision is not None and m.get("precision") != precision:
        raise CheckpointError(f"{where}: saved with precision={m.get('precision')} and resuming needs the same "
                              f"optimizer format; set precision={m.get('precision')}, or start a new stage from it "
                              f"with model.init_from (weights only)")
