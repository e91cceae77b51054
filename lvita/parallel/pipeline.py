"""Long-VITA as a DeepSpeed PipelineModule: thin ``*Pipe`` adapters around the plain blocks.

Owns the layer list and the tuple protocol between pipeline stages (gpt-neox style):

    stage input (from the data):  (input_ids (B,S), position_ids (B,S), pixel_values (N,3,H,W)
                                   [, feature_index (k,) for sequence-parallel shards])
    EmbedPipe         -> (hidden (B,S,D), position_ids)   vision + projector + embeddings + splice
    DecoderLayerPipe  -> (hidden (B,S,D), position_ids)   one per Qwen2 layer
    HeadPipe          -> (normed hidden (B,S,D), the LM head's weight through a view (V,D))
    loss (last stage): LabelledLoss((normed, weight), (labels (B,S), loss_scale ())) runs the LM head
                       on labelled positions only, ``logits_chunk`` at a time (model.logits_chunk).

The vision encoder sits in the first layer spec, so DeepSpeed's ``parameters`` partitioning
counts its weights on stage 0. Every block is seeded ``seed + index`` (``seed_layers``), which is
what :func:`to_sequential` relies on to give the plain model with the very same weights.

    module = build_pipeline("tiny", image_token_id=5, seed=42, num_stages=2)   # needs dist init
    plain = to_sequential("tiny", image_token_id=5, seed=42)

Trade-off: position ids travel between stages with the activations (an int tensor, no gradient)
instead of being recomputed; it keeps every stage independent of the data.
"""
from __future__ import annotations

import torch
from torch import nn
from deepspeed.pipe import LayerSpec, PipelineModule

from lvita.errors import ConfigError
from lvita.model.lm_head import DEFAULT_LOGITS_CHUNK
from lvita.model.longvita import DecoderLayer, LMHead, LongVita, MultimodalEmbedding
from lvita.model.presets import llm_config
from lvita.model.longvita import plain_key


class EmbedPipe(MultimodalEmbedding):
    def forward(self, inputs):
        input_ids, position_ids, pixel_values, *index = inputs  # index: sequence-parallel shards
        return super().forward(input_ids, pixel_values, index[0] if index else None), position_ids


class DecoderLayerPipe(DecoderLayer):
    def forward(self, inputs):
        hidden, position_ids = inputs
        return super().forward(hidden, position_ids), position_ids


class HeadPipe(LMHead):
    """The plain head; its ``loss_sum`` (chunked logits) is what :class:`LabelledLoss` calls.

    Its outputs carry the LM head's weight as a view made in this forward, and the loss uses that view:
    DeepSpeed clears the low-precision gradients (BF16_Optimizer.backward_prologue) when the first
    gradient reaches a forward output, and the loss runs outside the module (DeepSpeed's ``loss_fn``), so
    a weight read there directly would get its gradient before that clear, and lose it: under
    bf16 the head did not train (tests/test_pipeline.py). Through the view, the gradient reaches an
    output first and the weight after the clear."""

    def forward(self, inputs):
        hidden, _ = inputs
        weight = self.lm_head.weight
        return super().forward(hidden), weight.view(weight.shape)


class LabelledLoss:
    """DeepSpeed ``loss_fn``: sum of labelled-token cross-entropies times the micro-batch's scale.

    The scale is ``micro-batches per step * data-parallel ranks / labelled tokens in the global
    batch``, so that DeepSpeed's average over micro-batches and ranks gives the token-weighted mean
    of the whole global batch, whatever the layout; under ``train.loss_reduction: sequence`` it is one
    scale per row, so each packed sequence's token mean weighs the same
    (:func:`lvita.data.stream.rank_micro_batches`). The LM head's logits exist one chunk at a
    time, in forward and in the backward DeepSpeed runs from the returned loss
    (``HeadPipe.logits_chunk``, from model.logits_chunk).
    """

    def __init__(self):
        self.head: LMHead | None = None

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels) -> torch.Tensor:
        normed, weight = outputs  # HeadPipe's: (B, S[/sp], D), the head's weight (V, D) through a view
        targets, scale = labels  # (B, S[/sp]); () one scale for the micro-batch, or (B,) one per row
        if scale.ndim == 0:
            return self.head.loss_sum(normed, targets, weight)[0] * scale
        return sum(self.head.loss_sum(normed[b:b + 1], targets[b:b + 1], weight)[0] * scale[b]
                   for b in range(len(scale)))


class LongVitaPipeline(PipelineModule):
    """PipelineModule whose ``parameters`` partitioning counts weights on the meta device.

    DeepSpeed's own count builds every layer for real on every rank (minutes and tens of GB for
    the 14B preset); counting shapes gives the same numbers without allocating.
    """

    def _count_layer_params(self):
        return spec_param_counts(self._layer_specs)

    def add_frozen_stage_placeholder(self) -> dict:
        """For a stage that trains nothing (stage 1 trains only the projector, which sits on stage
        0): DeepSpeed still needs an optimizer and a gradient here, so add one zero weight that
        joins the output as ``+ 0 * w``. Returns its optimizer param group (lr 0)."""
        self.frozen_stage_placeholder = nn.Parameter(torch.zeros(1))
        self.frozen_stage_placeholder.model_parallel = True
        return {"params": [self.frozen_stage_placeholder], "name": "placeholder", "module": "none",
                "lr": 0.0, "weight_decay": 0.0}

    def forward(self, forward_input):
        out = super().forward(forward_input)
        w = getattr(self, "frozen_stage_placeholder", None)
        if w is None or not torch.is_grad_enabled():
            return out
        if isinstance(out, tuple):
            return (out[0] + 0 * w.to(out[0].dtype).sum(), *out[1:])
        return out + 0 * w.to(out.dtype).sum()


def spec_param_counts(specs: list[LayerSpec]) -> list[int]:
    with torch.device("meta"):
        return [sum(p.numel() for p in spec.build().parameters()) for spec in specs]


def partition(specs: list[LayerSpec], num_stages: int, method: str = "parameters") -> list[int]:
    """Stage boundaries as DeepSpeed computes them: stage s owns specs[parts[s]:parts[s+1]]."""
    from deepspeed.runtime import utils as ds_utils

    method = method.lower()
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(specs), num_parts=num_stages)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=spec_param_counts(specs), num_parts=num_stages)
    if method.startswith("type:"):
        import re

        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if pattern.search(spec.typename.__name__) else 0 for spec in specs]
        return ds_utils.partition_balanced(weights=weights, num_parts=num_stages)
    raise ConfigError(f"parallel.partition_method '{method}': use parameters, uniform or type:REGEX")


def layer_specs(preset, image_token_id, checkpoint: bool = False,
                logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> list[LayerSpec]:
    n_layers = llm_config(preset).num_hidden_layers
    specs = [LayerSpec(EmbedPipe, preset, image_token_id, checkpoint)]
    specs += [LayerSpec(DecoderLayerPipe, preset, i, checkpoint) for i in range(n_layers)]
    specs.append(LayerSpec(HeadPipe, preset, logits_chunk))
    return specs


def build_pipeline(preset, image_token_id, seed: int, num_stages: int,
                   partition_method: str = "parameters", checkpoint: bool = False,
                   topology=None, logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> PipelineModule:
    """The PipelineModule (torch.distributed must be initialised). Loss head is wired in.
    ``preset``: the model's description (lvita.model.presets.ModelSpec) or a preset name;
    ``image_token_id``: the context placeholder id(s) (lvita.data.input_format.InputFormat.context_ids).
    ``topology``: a DeepSpeed PipeDataParallelTopology (lvita.parallel.topology), else pipe x data.
    ``logits_chunk``: model.logits_chunk, labelled tokens per chunk of the loss's logits."""
    loss = LabelledLoss()
    module = LongVitaPipeline(
        layers=layer_specs(preset, image_token_id, checkpoint, logits_chunk),
        num_stages=None if topology is not None else num_stages,
        topology=topology,
        loss_fn=loss,
        partition_method=partition_method,
        seed_layers=True,
        seed_fn=torch.manual_seed,
        base_seed=seed,
        activation_checkpoint_interval=0,  # checkpointing is done per layer by DecoderLayer
    )
    # DeepSpeed's gradient-norm code (clipping, ZeRO, bf16) counts a parameter only on model-parallel
    # rank 0 unless it is tagged model-parallel; every weight here lives on exactly one pipeline
    # stage, so each stage must count its own and the sum over the pipe group gives the true norm.
    for p in module.parameters():
        p.model_parallel = True
    heads = [f for f in module.forward_funcs if isinstance(f, HeadPipe)]
    loss.head = heads[0] if heads else None
    return module


def to_sequential(preset, image_token_id, seed: int, checkpoint: bool = False,
                  logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> LongVita:
    """The plain single-device model with the same initial weights as :func:`build_pipeline`."""
    return LongVita(preset, image_token_id, seed=seed, checkpoint=checkpoint, logits_chunk=logits_chunk)


def plain_name(pipe_name: str, n_layers: int) -> str:
    """Map a PipelineModule parameter name ('3.layer.mlp...') to the plain model's name."""
    idx, rest = pipe_name.split(".", 1)
    return plain_key(int(idx), rest, n_layers)
