"""Memory levers for long sequences, applied to a built model from outside (as attention is).

Owns the switches that trade compute or host memory for GPU memory, each a stage key, each
DeepSpeed's own piece (DeepSpeed-ALST, arXiv 2506.13996) rather than a rewrite:

- ``model.tiled_mlp``: every decoder MLP runs through ``deepspeed.runtime.sequence_parallel.
  ulysses_sp.TiledMLP``: ceil(local tokens / hidden) sequence shards, no intermediate
  activations kept, recomputed shard by shard in backward. The MLP's working set falls from
  tokens x intermediate x several tensors to one shard's; costs one more MLP forward per step.
  The shard count depends only on the local sequence length, equal on every sequence rank.
- ``model.activation_offload`` (needs ``model.activation_checkpointing``): the decoder layers
  checkpoint through ``deepspeed.checkpointing.checkpoint`` with ``cpu_checkpointing``, so each
  layer's saved input waits in host memory (copied asynchronously on GPUs) until its backward.
  GPU memory for activations no longer grows with layers x micro-batches in flight; costs
  host memory and PCIe traffic. DeepSpeed's setting is process-global.
- ``train.optimizer_offload``: ZeRO-Offload (``zero_optimization.offload_optimizer``, set by
  :func:`lvita.config.validate.deepspeed_config`): fp32 master weights and Adam states in host memory,
  stepped by DeepSpeed's CPU Adam (:func:`lvita.training.optim.build_optimizer`). Not applied here.

    module = build_pipeline(...)
    for line in apply_levers(module, cfg.model): log(line)

Each lever keeps the loss and every gradient of the plain model (fp32 tests in tests/test_levers.py).
"""
from __future__ import annotations

import math
from types import MethodType

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from lvita.config.schema import ModelConfig
from lvita.model.longvita import DecoderLayer


def _mlp(self: Qwen2MLP, x: torch.Tensor) -> torch.Tensor:
    return Qwen2MLP.forward(self, x)  # the class's own forward, not the tiled instance attribute


def _tiled_forward(self: Qwen2MLP, x: torch.Tensor) -> torch.Tensor:
    """x (B, S_local, hidden) -> (B, S_local, hidden), ceil(S_local / hidden) shards."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
    if shards == 1 or not torch.is_grad_enabled():
        return _mlp(self, x)
    weights = list(self.parameters())  # the trainable ones (TiledMLP filters): base weights or LoRA adapters
    return TiledMLP.apply(_mlp, self, x, shards, weights)


def tile_mlps(model: nn.Module) -> int:
    """Route every Qwen2 MLP of ``model`` through DeepSpeed's TiledMLP; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, Qwen2MLP):
            m.forward = MethodType(_tiled_forward, m)
            n += 1
    return n


def offload_checkpoints(model: nn.Module) -> int:
    """Checkpoint every decoder layer of ``model`` through DeepSpeed with its inputs in host memory
    (torch.distributed must be initialised: DeepSpeed's configure reads the rank). Returns how many
    layers; 0 on a CPU accelerator, where activations already live in host memory (and DeepSpeed's
    synchronous fallback there would alias the copy it makes with the tensor it empties)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if any(not layer.checkpoint for layer in layers):
        raise ValueError("model.activation_offload moves checkpointed layer inputs to host memory; "
                         "set model.activation_checkpointing=true as well")
    if get_accelerator().is_synchronized_device():
        return 0
    deepspeed.checkpointing.configure(None, checkpoint_in_cpu=True)
    for layer in layers:
        layer.checkpoint_fn = deepspeed.checkpointing.checkpoint
    return len(layers)


def apply_levers(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """Apply the levers ``cfg`` switches on; one line per lever applied, for the log."""
    done = []
    if cfg.tiled_mlp:
        done.append(f"tiled MLP on {tile_mlps(model)} decoder layers (DeepSpeed TiledMLP)")
    if cfg.activation_offload:
        n = offload_checkpoints(model)
        done.append(f"activation offload to host memory on {n} checkpointed layers" if n else
                    "activation offload: nothing to do on a CPU device (activations are in host memory)")
    return done

