"""Model weights alone: start a stage from another stage's checkpoint or from Hugging Face weights.

Owns ``model.init_from`` and the weights side of ``lvita convert``. The unit is the *plain state
dict* (keys of :class:`lvita.model.longvita.LongVita`: ``embed.*``, ``layers.<i>.*``, ``head.*``);
a pipeline block ``k`` holds ``embed`` (k = 0), ``layers.<k-1>`` or ``head`` (k = layers + 1), and
a checkpoint stores block ``k`` in ``layer_<k>-model_states.pt`` whatever the pipeline degree, so
each rank reads just the blocks it owns; from an HF directory it reads just their tensors from the
memory-mapped safetensors shards (``hf_read.read_hf(keep=...)``).

    model.init_from = "runs/stage1"                         # an lvita output_dir / checkpoints / tag
    model.init_from = "hf/Long-VITA-16K"                    # an InternVL-format HF directory
    model.init_from = ["hf/InternViT-300M-448px", "hf/Qwen2.5-14B-Instruct"]   # projector starts fresh

Every key and shape is checked against the model first: a mismatch names the file, the key and
both shapes. Weights are loaded before DeepSpeed wraps the model, so it builds its fp32/bf16
copies from them; optimizer and LR schedule start fresh (that is what a new stage wants).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lvita.ckpt.checkpoint import CheckpointError, check_fits, locate
from lvita.model.formats import INTERNVL, ModelFormat
from lvita.model.longvita import block_of, by_block, plain_key
from lvita.model.lora import has_adapters, merged, scaling


def layer_file(tag_dir: Path, block: int) -> Path:
    return tag_dir / f"layer_{block:02d}-model_states.pt"


def read_block(tag_dir: Path, block: int, merge: bool = True) -> dict[str, torch.Tensor]:
    """Block ``block``'s weights in a checkpoint, plain names. A LoRA run's adapters (model.lora) are merged
    into their weights (``W + alpha / rank * B @ A``, lvita.model.lora.merged) unless ``merge`` is false
    (PEFT's names then: ``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``)."""
    state = _read_block(tag_dir, block)
    if merge and has_adapters(state):
        state = merged(state, lora_scaling(tag_dir))
    return state


def lora_scaling(tag_dir: Path) -> float:
    """alpha / rank of the LoRA run that saved ``tag_dir`` (its manifest's ``lora``)."""
    from lvita.ckpt.checkpoint import MANIFEST

    try:
        lora = json.loads((Path(tag_dir) / MANIFEST).read_text()).get("lora")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tag_dir}: holds LoRA adapters but its {MANIFEST} cannot be read ({e})") from None
    try:
        scale = scaling(lora)
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):  # none, or not {"rank": >= 1, "alpha": number}
        raise CheckpointError(f"{tag_dir}: holds LoRA adapters but its {MANIFEST} records no usable model.lora (rank, "
                              f"alpha: {lora!r}): the adapters' scale is unknown") from None
    return scale


def _read_block(tag_dir: Path, block: int) -> dict[str, torch.Tensor]:
    path = layer_file(tag_dir, block)
    if not path.is_file():
        raise CheckpointError(f"{tag_dir}: missing {path.name} (model block {block}); the checkpoint is damaged "
                              f"or was saved for a model with fewer layers")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged zip
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is damaged") from None


def checkpoint_plain_state(tag_dir: Path, n_layers: int, merge: bool = True) -> dict[str, torch.Tensor]:
    """All blocks of a checkpoint as one plain state dict (for export); LoRA adapters merged unless ``merge``
    is false (:func:`read_block`)."""
    return {plain_key(b, k, n_layers): v for b in range(n_layers + 2)
            for k, v in read_block(tag_dir, b, merge).items()}


def local_blocks(module) -> dict[int, nn.Module]:
    """{block index: module} for the blocks this pipeline rank owns (or every block of a LongVita)."""
    if hasattr(module, "forward_funcs"):
        return {module._local_start + i: f for i, f in enumerate(module.forward_funcs) if isinstance(f, nn.Module)}
    return {0: module.embed, **{i + 1: m for i, m in enumerate(module.layers)}, len(module.layers) + 1: module.head}


def load_block(block: nn.Module, state: dict[str, torch.Tensor], source: str, optional: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``block`` after checking keys and shapes; keys starting with one of
    ``optional`` may be absent (they keep their current values)."""
    own = block.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit the model: missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}; was it saved for another model.preset?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: '{k}' has shape {tuple(v.shape)} but the model wants "
                                  f"{tuple(own[k].shape)}; set model.preset to the one the weights were made for")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def check_tokenizer(paths: list[Path], tokenizer: dict, fmt: ModelFormat = INTERNVL) -> None:
    """An HF directory that ships a tokenizer must have the stage's vocabulary (after lvita adds the
    format's tokens to both: under longvita the 17 official ones)."""
    from lvita.ckpt.checkpoint import tokenizer_fingerprint
    from lvita.data.tokenizer import load_tokenizer

    for path in paths:
        if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
            continue
        theirs = tokenizer_fingerprint(load_tokenizer(path, fmt))
        if theirs != tokenizer:
            raise CheckpointError(f"model.init_from={path}: its tokenizer has {theirs['size']} tokens (hash "
                                  f"{theirs['sha256']}) but model.tokenizer has {tokenizer['size']} (hash "
                                  f"{tokenizer['sha256']}); token ids would mean other words. Point model.tokenizer "
                                  f"at {path}")


def init_from(module, spec: str | list[str], preset, tokenizer: dict) -> str:
    """Load ``model.init_from`` into ``module`` (a pipeline module or a LongVita); returns what was loaded.
    ``preset``: the model's description (lvita.model.presets.ModelSpec) or a preset name."""
    from lvita.model.presets import llm_config, spec_of

    n_layers = llm_config(preset).num_hidden_layers
    blocks = local_blocks(module)
    paths = [Path(spec)] if isinstance(spec, str) else [Path(p) for p in spec]
    if len(paths) == 1 and not (paths[0] / "config.json").is_file():  # an lvita checkpoint
        found = locate(paths[0], "model.init_from")
        check_fits(found, "model.init_from", preset, tokenizer)
        for b, m in blocks.items():
            load_block(m, read_block(found.tag_dir, b), str(layer_file(found.tag_dir, b)))
        return str(found.tag_dir)
    from lvita.ckpt import hf_read

    # Only the tensors of this rank's blocks are read (the headers still check the whole model).
    state, fresh = hf_read.read_hf(paths, preset, keep=lambda k: block_of(k, n_layers)[0] in blocks)
    check_tokenizer(paths, tokenizer, spec_of(preset).format)
    per_block = by_block(state, n_layers)
    optional = tuple(block_of(k, n_layers)[1] for k in fresh)
    for b, m in blocks.items():
        load_block(m, per_block.get(b, {}), " + ".join(map(str, paths)), optional if b == 0 else ())
    return " + ".join(map(str, paths)) + (f" ({len(fresh)} projector weights start fresh)" if fresh else "")


def write_blocks(engine, tag_dir: Path) -> None:
    """Collective: write ``layer_XX-model_states.pt`` (one file per model block, the pipeline's layout-free
    weight files) from global rank 0, gathering each block's ZeRO-3 shards in turn."""
    import torch.distributed as dist

    from lvita.parallel.internals import check, resolve

    zero = resolve("deepspeed.runtime.zero")
    check(zero, "zero3_api", "saving the per-block weights")
    rank = dist.get_rank() if dist.is_initialized() else 0
    for b, block in local_blocks(engine.module).items():
        with zero.GatheredParameters(list(block.parameters()), modifier_rank=None):
            if rank == 0:
                state = {k: v.detach().clone().cpu() for k, v in block.state_dict().items()}
                path = layer_file(Path(tag_dir), b)
                tmp = path.with_name(path.name + ".tmp")
                torch.save(state, tmp)
                tmp.replace(path)
