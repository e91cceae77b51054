"""A LoRA checkpoint exported as PEFT adapter files, and the base they apply to.

Owns ``lvita convert to-hf --adapter-only`` and ``--base-only`` (:mod:`lvita.ckpt.convert` parses them):

- ``--adapter-only`` writes what PEFT 0.22's ``PeftModel.save_pretrained`` writes for a LoRA model:
  ``adapter_config.json`` (``peft.LoraConfig(...).save_pretrained``: rank, alpha, dropout,
  ``target_modules`` = the exact module path of every adapted linear in the exported model) and
  ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` (rank x in) and
  ``...lora_B.weight`` (out x rank), the adapter name left out as PEFT leaves it out. ``<module>`` is the
  exported base's name for the linear, from the weight export's own one-key rules
  (:func:`lvita.ckpt.hf.plain_key_to_hf`, :func:`lvita.ckpt.released.plain_key_to_released`), so the two
  cannot disagree. ``PeftModel.from_pretrained(base, DIR)`` then computes what the unmerged lvita model
  computes (tests/test_lora_export.py).
- Whole modules the run trained beside the adapters (``model.trainable``, read from the checkpoint's
  stage config: ``vision``, ``projector``) go in as PEFT's ``modules_to_save`` (the exported module, e.g.
  ``model.multi_modal_projector``, saved whole under ``base_model.model.<module>.*``): PEFT swaps them in
  on load. A wholly trained ``llm`` is refused (the released layout has no one module for it, and PEFT would
  wrap the embedding, every layer and the head one by one; export merged).
- ``--base-only`` writes the checkpoint's base weights (adapters left out, trained modules as trained) in
  the export layout: the base an adapter directory applies to. The frozen weights are those
  ``model.init_from`` loaded, so an HF directory in the same format that the run started from serves as
  well (bit for bit when its dtype is the run's precision).

Trade-off: the files are written here, not by PEFT on an instantiated model (which needs the whole base
in memory); that they are what PEFT writes is tested by a round trip through PEFT's own loader and
``save_pretrained`` (same keys, tensors and config). A vision LoRA on q/k/v cannot be written for the
released layout, which fuses them into ``attn.qkv`` (one PEFT module, one adapter): refused.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lvita.ckpt.checkpoint import CheckpointError, staged_dir
from lvita.errors import PathError
from lvita.model.formats import INTERNVL, LONGVITA, ModelFormat
from lvita.model.longvita import module_of

PEFT_PREFIX = "base_model.model."  # PeftModel's path to the base model's modules in a saved adapter
# model.trainable's groups -> the one module of the export that holds each (PEFT's modules_to_save)
SAVED_MODULES = {LONGVITA: {"vision": "model.vision_model", "projector": "model.vision_projection"},
                 INTERNVL: {"vision": "model.vision_tower", "projector": "model.multi_modal_projector"}}
INTERNVL_CLASS = {"base_model_class": "InternVLForConditionalGeneration",
                  "parent_library": "transformers.models.internvl.modeling_internvl"}


def export_key(plain_key: str, fmt: ModelFormat) -> str | None:
    """The exported model's name for one plain key (the weight export's rule for that format)."""
    if fmt is LONGVITA:
        from lvita.ckpt.released import plain_key_to_released

        return plain_key_to_released(plain_key)
    from lvita.ckpt.hf import plain_key_to_hf

    return plain_key_to_hf(plain_key)


def run_lora(found, flag: str) -> dict:
    """The manifest's ``lora`` (rank, alpha, dropout, targets); CheckpointError when the run had none."""
    lora = found.manifest.get("lora")
    if not lora:
        raise CheckpointError(f"{flag}: {found.tag_dir} holds no LoRA adapters (its run had no model.lora); "
                              f"export it without {flag}")
    return lora


def trained_modules(found) -> list[str]:
    """``model.trainable`` of the run that saved ``found`` (its manifest records it beside ``lora``)."""
    trainable = found.manifest.get("trainable")
    if not isinstance(trainable, list):
        raise CheckpointError(f"{found.tag_dir}: cannot read the run's model.trainable (its manifest records none); "
                              f"--adapter-only needs it to know which modules trained whole")
    return list(trainable)


def adapter_tensors(unmerged: dict[str, torch.Tensor], fmt: ModelFormat) -> tuple[dict, list[str]]:
    """PEFT's saved keys -> tensors for the adapters of ``unmerged`` (plain keys, PEFT's LoRA names), and
    the adapted modules' paths in the export (``target_modules``)."""
    from lvita.model.lora import adapter_state

    tensors, modules = {}, []
    for weight, (a, b) in sorted(adapter_state(unmerged).items()):
        name = export_key(weight, fmt)
        if name is None or ".attn.qkv." in name or not name.endswith(".weight"):
            raise CheckpointError(f"--adapter-only: the adapted linear {weight.removesuffix('.weight')} has no "
                                  f"module of its own in the {fmt} layout"
                                  + (" (it fuses q/k/v into attn.qkv)" if name and ".attn.qkv." in name else "")
                                  + "; export the merged model (without --adapter-only)")
        module = name.removesuffix(".weight")
        modules.append(module)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return tensors, modules


def saved_module_tensors(base: dict[str, torch.Tensor], trainable: list[str], fmt: ModelFormat) -> tuple[dict, list[str]]:
    """PEFT's ``modules_to_save`` for the run's wholly trained groups: (saved keys -> tensors, module paths)."""
    if "llm" in trainable:
        raise CheckpointError("--adapter-only: the run also trained the whole llm (model.trainable); the adapter "
                              "files carry only the vision tower and the projector whole (PEFT's modules_to_save), so "
                              "export the merged model (without --adapter-only)")
    tensors, modules = {}, []
    for group in trainable:
        module = SAVED_MODULES[fmt][group]
        modules.append(module)
        for key, value in base.items():
            if module_of(key) != group or key.endswith("inv_freq"):
                continue
            name = export_key(key, fmt)
            if name is None or not name.startswith(module + "."):  # a fused qkv is fine: the module goes whole
                raise CheckpointError(f"--adapter-only: {key} of the trained {group} is not under {module} in the "
                                      f"{fmt} layout; export the merged model")
            if ".attn.qkv." in name:
                continue
            tensors[PEFT_PREFIX + name] = value.contiguous()
        if fmt is LONGVITA and group == "vision":  # the released layout's fused q/k/v, as the weight export writes them
            from lvita.ckpt.released import to_released_state

            vision = to_released_state({k: v for k, v in base.items() if module_of(k) == group})
            tensors.update({PEFT_PREFIX + k: v.contiguous() for k, v in vision.items() if ".attn.qkv." in k})
    return tensors, modules


def write_adapter_dir(found, spec, out: str | Path, log=print) -> Path:
    """``OUT/adapter_config.json`` + ``OUT/adapter_model.safetensors`` for the LoRA checkpoint ``found``
    (:class:`lvita.ckpt.checkpoint.Found`) in the export layout of ``spec.format``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lvita.ckpt.weights import read_block
    from lvita.model.longvita import plain_key
    from lvita.model.lora import base_state, is_adapter

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PathError(f"--adapter-only: {out} exists and is not an empty directory; choose a new one")
    lora = run_lora(found, "--adapter-only")
    t0 = time.perf_counter()
    fmt, n_layers = spec.format, spec.llm["num_hidden_layers"]
    trainable = trained_modules(found)
    kept = {}  # block by block, only what the files carry: adapters and wholly trained modules (not the frozen base)
    for b in range(n_layers + 2):
        for k, v in read_block(found.tag_dir, b, merge=False).items():
            key = plain_key(b, k, n_layers)
            if is_adapter(key) or module_of(key) in trainable:
                kept[key] = v
    tensors, targets = adapter_tensors(kept, fmt)
    if not targets:
        raise CheckpointError(f"--adapter-only: {found.tag_dir} records model.lora but its weights hold no adapters; "
                              f"the checkpoint is damaged")
    saved, to_save = saved_module_tensors(base_state(kept), trainable, fmt)
    config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                        target_modules=targets, modules_to_save=to_save or None, bias="none")
    with staged_dir(out) as tmp:
        save_file({**tensors, **saved}, str(tmp / "adapter_model.safetensors"), {"format": "pt"})
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        config.save_pretrained(str(tmp), auto_mapping_dict=INTERNVL_CLASS if fmt is INTERNVL else None)
    log(f"lvita convert: wrote the LoRA adapters of {found.tag_dir} (rank {lora['rank']}, alpha {lora['alpha']:g}, "
        f"{len(targets)} linear layers" + (f", {' and '.join(trainable)} whole as modules_to_save" if trainable else "")
        + f") to {out} in {time.perf_counter() - t0:.1f}s; apply them with PeftModel.from_pretrained(base, DIR) to "
        f"the base written by `lvita convert to-hf CKPT BASE --base-only --format {fmt}`")
    return out
