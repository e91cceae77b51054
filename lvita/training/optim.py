"""Freezing, per-module parameter groups, AdamW and the warmup + cosine schedule.

Owns which weights train and how fast. ``freeze`` leaves ``requires_grad`` only on the modules a
stage trains (``model.trainable``: vision / projector / llm) and on LoRA adapters (``model.lora``, which train
at their module's rate); ``param_groups`` splits the rest
by module and by decay (no weight decay on biases and norms), each group carrying its module's
learning rate from ``train.lr`` (for the vision encoder, times a per-layer multiplier under
``train.vision_lr_decay``, Long-VITA stage 2's layer-wise decay). The schedule multiplies every group's base rate by the same
factor, so per-module ratios hold. Optimizer and schedule are handed to DeepSpeed, which owns
their state in checkpoints.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from lvita.config.schema import TrainConfig
from lvita.model.longvita import module_of
from lvita.model.lora import trains


def freeze(model: nn.Module, trainable: list[str], lora=None) -> dict[str, int]:
    """Set requires_grad by module (and under ``model.lora`` on every adapter, lvita.model.lora.trains);
    returns trainable parameter counts per module (adapters count with the module they adapt)."""
    counts = {"vision": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters():
        mod = module_of(name)
        p.requires_grad_(trains(name, trainable, lora))
        if p.requires_grad:
            counts[mod] += p.numel()
    return counts


def vision_layer(name: str, n_layers: int) -> int:
    """The depth of a vision parameter for layer-wise LR decay, as Long-VITA's Megatron optimizer counts it
    (``get_vit_lr_decay_rate``): patch and position embeddings 0, encoder layer i -> i + 1, anything else
    (the class token, which Megatron's test misses too) n_layers + 1."""
    m = re.search(r"\.encoder\.layer\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if ("patch_embeddings" in name or "position_embeddings" in name) else n_layers + 1


def lr_scales(model: nn.Module, train: TrainConfig) -> dict[str, float]:
    """Per-parameter LR multipliers under ``train.vision_lr_decay`` (scale x factor^(L + 1 - layer) for the
    vision encoder's L layers); parameters not listed keep 1."""
    decay = train.vision_lr_decay
    if not decay:
        return {}
    names = [n for n, _ in model.named_parameters() if module_of(n) == "vision"]
    layers = [int(m.group(1)) for n in names if (m := re.search(r"\.encoder\.layer\.(\d+)\.", n))]
    n_layers = max(layers) + 1 if layers else 0
    return {n: decay["scale"] * decay["factor"] ** (n_layers + 1 - vision_layer(n, n_layers)) for n in names}


def param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """Trainable parameters grouped by (module, weight decay or not, LR multiplier); each group's ``lr`` is
    its module's ``train.lr`` times the multiplier (``lr_scale``, kept for the log)."""
    scales = lr_scales(model, train)
    groups: dict[tuple[str, bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name and "embeddings" not in name
        groups.setdefault((module_of(name), decay, scales.get(name, 1.0)), []).append(p)
    return [
        {"params": ps, "name": f"{mod}" + ("" if decay else "_no_decay") + (f"_x{scale:.3g}" if scale != 1 else ""),
         "module": mod, "lr_scale": scale, "lr": train.lr[mod] * scale,
         "weight_decay": train.weight_decay if decay else 0.0}
        for (mod, decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2]))
    ]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``.

    ``step`` counts optimizer steps taken so far (0 before the first)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; with ``train.optimizer_offload`` DeepSpeed's CPU Adam in AdamW mode (the same update,
    vectorised for host memory, where ZeRO-Offload keeps the fp32 weights and states)."""
    lr = max(g["lr"] for g in groups)
    if train.optimizer_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(train.adam_betas), eps=train.adam_eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(train.adam_betas), eps=train.adam_eps)


def scheduler_factory(train: TrainConfig):
    """A callable DeepSpeed calls with its wrapped optimizer (so the schedule drives it)."""
    def make(optimizer):
        fn = lambda step: lr_factor(step, train.warmup_steps, train.iterations, train.min_lr_ratio)  # noqa
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    return make
