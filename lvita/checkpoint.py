"""Checkpoints: DeepSpeed saves under ``<output_dir>/checkpoints/<tag>`` plus our client state.

Owns what goes into a checkpoint besides DeepSpeed's own module/optimizer/scheduler state:
the step, the data stream's ``state_dict``, the stage config, and DeepSpeed's
``universal_checkpoint_info`` so ``python -m deepspeed.checkpoint.ds_to_universal`` converts a
checkpoint without ``--inject_missing_state``. ``load_weights`` starts a stage from another
stage's checkpoint: module weights only, fresh optimizer and schedule. Pipeline checkpoints are
stored per layer, so the previous stage may have used another pipeline degree.
"""
from __future__ import annotations

from pathlib import Path

from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)


def tag_for(step: int) -> str:
    return f"global_step{step}"


def save(engine, output_dir: str | Path, step: int, data_state: dict, config: dict) -> Path:
    """Collective: every rank must call it."""
    ckpt_dir = Path(output_dir) / "checkpoints"
    client = {
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        "lvita": {"step": step, "data": data_state, "config": config},
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state=client)
    return ckpt_dir / tag_for(step)


def resolve(path: str | Path) -> tuple[Path, str]:
    """``.../checkpoints`` (uses its ``latest`` file) or ``.../checkpoints/<tag>`` -> (dir, tag)."""
    path = Path(path)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and list(path.glob("layer_*-model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"model.init_from={path}: not a checkpoints/ directory with a 'latest' file "
                            f"nor a checkpoint tag directory; point it at the previous stage's "
                            f"<output_dir>/checkpoints")


def load_weights(engine, path: str | Path) -> str:
    """Load module weights only (fresh optimizer and LR schedule). Returns the tag loaded."""
    ckpt_dir, tag = resolve(path)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True,
                                          load_optimizer_states=False, load_lr_scheduler_states=False)
    if load_path is None:
        raise FileNotFoundError(f"model.init_from={path}: DeepSpeed found no checkpoint for tag {tag}")
    return tag
