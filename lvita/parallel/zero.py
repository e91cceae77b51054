"""The ZeRO engine: at ``parallel.pipeline`` 1 with ZeRO stage 2 or 3, the plain model under DeepSpeed's
``DeepSpeedEngine`` (``deepspeed.initialize`` on an nn.Module) instead of the pipeline engine.

Owns :class:`ZeroModel` (the plain :class:`~lvita.model.longvita.LongVita`, the very weights
``to_sequential`` gives, whose forward takes the pipeline's micro-batch tuples and returns the same
scaled loss as lvita.parallel.pipeline.LabelledLoss), :func:`build_zero_model` and :class:`ZeroSteps`
(``train_batch`` over a step's micro-batches, as the pipeline engine's); the per-block weight files every
lvita checkpoint carries are gathered from the ZeRO-3 shards by :func:`lvita.ckpt.weights.write_blocks`.

    module = build_zero_model(spec, context_ids, seed)           # then freeze, param groups, levers as usual
    engine, *_ = deepspeed.initialize(model=module, optimizer=..., config=ds_cfg)   # ZeRO stage 2/3
    steps = ZeroSteps(engine)
    loss = steps.train_batch(iter(micro_batches))                # ((ids, pos, pix[, index]), (targets, scale))

Layout and loss: as on the pipeline engine, sequence ranks are folded into DeepSpeed's data axis (no mpu:
its data-parallel group is the world), so gradients are averaged over data x sequence ranks and the loss
scale (lvita.data.stream.rank_micro_batches; times sp in lvita.parallel.sequence.shard_micro_batch) undoes
that average and DeepSpeed's division by the accumulation steps: loss and gradients are the single
process's at every layout (tests/test_zero_engine.py). Attention (Ulysses, ring, hybrid) is injected from
outside as on the pipeline (lvita.parallel.hybrid). DeepSpeed-ALST's ``UlyssesSPAttentionHF`` is not used:
it replaces transformers' attention by name and takes its groups from an mpu, where lvita's kernels and
groups exist already (lvita.parallel.topology); its TiledMLP and offloaded checkpoints are
(lvita.training.levers).

ZeRO-3 gathers a module's weights around that module's forward and backward. The LM head's weight is
used by the chunked loss, not by ``lm_head``'s own forward: the loss runs inside ``LMHead.forward`` and
the weight is registered as that module's external parameter (gathered for the head only). DeepSpeed
0.19.8 would also register it by itself on first access inside a forward (its ``ZeROOrderedDict``); the
explicit registration keeps that independent of how the access is traced.

Trade-offs: the model is built whole on every rank before DeepSpeed partitions it (no ``zero.Init``: the
blocks' seeded initialisation, which the equality with ``to_sequential`` relies on, writes whole
tensors), so start-up peaks at one full fp32 model per GPU (the memory plan counts it, Plan.startup in
lvita check's output: 57.7 GiB at 14B). Checkpoints gather every block once
at save time to write the layout-free per-block files (one block's weights at a time).
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from lvita.model.lm_head import DEFAULT_LOGITS_CHUNK
from lvita.model.longvita import LongVita


class ZeroModel(LongVita):
    """The plain model taking the pipeline engine's micro-batch tuples (lvita.data.stream)."""

    def forward(self, inputs, labels) -> torch.Tensor:
        """inputs (ids (B,S), pos (B,S), pix (N,3,T,T)[, feature_index (k,)]), labels (targets (B,S),
        scale () or (B,)) -> sum of labelled cross-entropies times the scale (per row for a (B,) scale)."""
        ids, pos, pix, *index = inputs
        targets, scale = labels
        hidden = self.embed(ids, pix, index[0] if index else None)
        for layer in self.layers:
            hidden = layer(hidden, pos)
        if scale.ndim == 0:
            return self.head(hidden, targets)[0] * scale
        return sum(self.head(hidden[b:b + 1], targets[b:b + 1])[0] * scale[b] for b in range(len(scale)))


def build_zero_model(preset, image_token_id, seed: int, checkpoint: bool = False,
                     logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> ZeroModel:
    """The plain model with ``to_sequential``'s weights (blocks seeded ``seed + index``), ready for
    ``deepspeed.initialize`` at any ZeRO stage: the LM head's weight is registered for ZeRO-3."""
    from lvita.parallel.internals import check, resolve

    model = ZeroModel(preset, image_token_id, seed=seed, checkpoint=checkpoint, logits_chunk=logits_chunk)
    zero = resolve("deepspeed.runtime.zero")
    check(zero, "zero3_api", "the ZeRO engine")
    zero.register_external_parameter(model.head, model.head.lm_head.weight)
    return model


class ZeroSteps:
    """One optimizer step over a list of micro-batches on a DeepSpeedEngine, as ``PipelineEngine.train_batch``:
    forward, backward and ``engine.step()`` per micro-batch (DeepSpeed steps the optimizer at the
    accumulation boundary); returns the mean over micro-batches and ranks of the returned losses.

    ``total_loss`` / ``is_last_stage()`` mirror the pipeline engine's for the non-finite guard
    (lvita.training.guard), which reads this rank's loss when the optimizer steps."""

    def __init__(self, engine):
        from lvita.parallel.internals import check_engine

        check_engine(engine, "the ZeRO engine's steps", pipeline=False)
        self.engine = engine
        self.total_loss: torch.Tensor | None = None

    @staticmethod
    def is_last_stage() -> bool:
        return True  # one stage: every rank computes a loss

    def _to_device(self, x):
        if torch.is_tensor(x):
            return x.to(self.engine.device, non_blocking=True)
        return tuple(self._to_device(t) for t in x)

    def train_batch(self, data_iter, before_step=None) -> torch.Tensor:
        """``before_step``: called after the last micro-batch's backward, before the optimizer steps (tests
        read the reduced gradients there)."""
        engine = self.engine
        micro = list(data_iter)
        if len(micro) != engine.gradient_accumulation_steps():
            raise ValueError(f"{len(micro)} micro-batches for a step of {engine.gradient_accumulation_steps()}")
        self.total_loss = None
        for i, (inputs, labels) in enumerate(micro):
            loss = engine(self._to_device(inputs), self._to_device(labels))
            engine.backward(loss)
            self.total_loss = loss.detach() if self.total_loss is None else self.total_loss + loss.detach()
            if before_step is not None and i == len(micro) - 1:
                before_step()
            engine.step()
        mean = self.total_loss.float() / len(micro)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean)
            mean = mean / dist.get_world_size()
        return mean
