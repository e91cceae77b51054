"""The memory plan: predicted peak GPU memory per pipeline stage, before anything is allocated.

Owns the arithmetic behind ``lvita check``'s memory table and ``--suggest``. Per stage, in bytes:

- weights, gradients, optimizer states and ZeRO's buffers (reduce bucket; under ZeRO-3 the gathered
  parameters and prefetch) for the engine the run gets: DeepSpeed's pipeline engine (ZeRO 0-1) or, at
  ``parallel.pipeline == 1`` with ZeRO 2-3 in the DeepSpeed JSON, the plain model under the ZeRO engine;
  ZeRO shards over DeepSpeed's data axis = data x sequence ranks (:mod:`lvita.config.zero_memory`,
  with the optimizer and parameter offloads);
- activations: what autograd keeps per micro-batch (with activation checkpointing each layer's
  input, without it everything :func:`layer_saved` counts), times the micro-batches in flight under
  DeepSpeed's 1F1B schedule on that stage (``min(pipeline - stage, accumulation)``); with
  ``model.activation_offload`` only the newest layer input stays on the GPU;
- the largest transient: one layer recomputed and back-propagated at the local sequence length
  (the MLP over one shard of ``hidden`` tokens with ``model.tiled_mlp``), the vision encoder's tiles,
  or the loss's logits chunk; communication buffers (pipeline sends, Ulysses all-to-all, the ring's
  blocks as lvita's own ring kernel holds them in backward: yunchang's flash-attn ring holds less) and a
  fixed 1.5 GiB for the CUDA context and library workspaces.

The saved-activation formulas were read off what autograd saves for transformers' Qwen2 and InternViT layers,
trained or frozen with PEFT's LoRA adapters (``model.lora``: gradients still flow through the frozen layers to
reach the adapters, :func:`layer_saved`) (``tests/test_memory_plan.py`` checks them against saved-tensor hooks
on the tiny model at several lengths and layouts); attention is counted as the kernel saves it: flash
attention on GPUs (q, k, v at KV width, output, log-sum-exp), per-sample SDPA with KV heads repeated on CPU.
Worst cases are assumed where the data decides: every local token labelled, image tokens filling the local
sequence.

    plan = memory_plan(cfg, layout)          # cfg: StageConfig, layout: lvita.config.validate.Layout
    plan.bound.total / 2**30, plan.fits(80)

Trade-off: allocator fragmentation and kernels' private workspaces are not modelled beyond the
fixed overhead; treat a plan within ~10% of the GPU's size as not fitting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lvita.config.zero_memory import Zero, engine_of, model_states, zero_of
from lvita.model.flops import Shapes, linear_widths, llm_adapted

GIB = 2**30
OVERHEAD = int(1.5 * GIB)  # CUDA context, cuBLAS / NCCL workspaces


@dataclass(frozen=True)
class Adapted:
    """How a decoder layer trains, for :func:`layer_saved`: ``linears`` are the LoRA-adapted projections of a
    frozen layer (PEFT leaf names), ``rank`` and ``dropout`` the adapters'; None in place of an Adapted: the
    layer's weights train."""
    linears: frozenset = frozenset()
    rank: int = 0
    dropout: float = 0.0


def adapted_of(trainable, lora) -> "Adapted | None":
    """The decoder layers' :class:`Adapted` for ``model.trainable`` and ``model.lora`` (None: the LLM trains)."""
    if "llm" in trainable:
        return None
    if lora is None:
        return Adapted()
    return Adapted(llm_adapted(lora), int(lora.rank), float(lora.dropout))


def layer_saved(s: Shapes, tokens: int, e: int, attention: str = "flash", tiled_mlp: bool = False,
                adapted: "Adapted | None" = None, grad_in: bool = True) -> int:
    """Bytes autograd saves for one Qwen2 decoder layer over ``tokens`` tokens (no checkpointing).

    Per token, the layer training (``adapted`` None): each RMSNorm keeps its fp32 input, 1/rms, the
    normalised and the weighted output; attention keeps its kernel's tensors; o_proj its input; the MLP
    gate, act(gate), up and their product (with ``tiled_mlp`` only the MLP input, as DeepSpeed's TiledMLP
    saves).

    Frozen (``adapted`` an :class:`Adapted`; gradients still flow through to reach the adapters and
    whatever trains before): a linear whose weight does not require grad saves nothing (its input
    gradient needs only the weight), nor does a norm's multiplication by its frozen weight, so each norm
    keeps its fp32 input and 1/rms, and a linear's input is kept only when it is adapted: PEFT's
    ``lora_A`` keeps it for its weight gradient (shared by q/k/v and by gate/up), ``lora_B`` keeps
    ``lora_A``'s output (rank wide) per adapted linear. The MLP's gate, act(gate) and up stay (gradients
    flow through the product). ``grad_in`` False (the first layer after a frozen embedding): the input norm
    keeps nothing of its own. With ``dropout`` > 0 each adapted linear keeps its own dropped input and
    dropout's mask instead of the shared input (no mask where its input carries no gradient); the mask is
    counted at ``e`` bytes an element as torch's CPU dropout keeps it (a float noise tensor): CUDA's fused
    dropout keeps one byte, so on GPUs the plan errs high there. Attention is counted whole even when no
    q/k/v projection is adapted (errs high). The same rule covers a frozen LLM without LoRA (stage 1:
    gradients pass through to the projector)."""
    if attention == "flash":
        attn = (2 * s.q + 2 * s.kv) * e + 4 * s.heads
    else:  # lvita's CPU path: SDPA per sample on KV heads repeated to the query heads
        attn = 4 * s.q * e + 4 * s.heads
    if adapted is None:
        norm = 4 * s.hidden + 4 + 2 * e * s.hidden
        mlp = e * s.hidden if tiled_mlp else 4 * s.inter * e
        return tokens * (2 * norm + attn + s.q * e + mlp)
    a, r = adapted.linears, adapted.rank
    width = {n: w[0] for n, w in linear_widths(s).items()}  # input widths

    def kept(names, masks=True):  # dropout: its own dropped input (and mask when its input carries gradients)
        if adapted.dropout:
            return sum(width[n] * (2 if masks else 1) * e for n in names & a)
        return max([0] + [width[n] * e for n in names & a])  # one input, shared
    stats = 4 * s.hidden + 4  # a norm's fp32 input and 1/rms
    norms = (stats if grad_in else 0) + kept({"q_proj", "k_proj", "v_proj"}, grad_in) + stats
    if tiled_mlp:  # TiledMLP keeps its input and recomputes the MLP (adapters included) in backward
        outside = len(a - {"gate_proj", "up_proj", "down_proj"})  # adapters whose lora_A output stays
        return tokens * (norms + attn + kept({"o_proj"}) + e * s.hidden + outside * r * e)
    mlp = kept({"gate_proj", "up_proj"}) + 3 * s.inter * e + kept({"down_proj"})
    return tokens * (norms + attn + kept({"o_proj"}) + mlp + len(a) * r * e)


def vit_saved_per_tile(s: Shapes, e: int, checkpoint: bool = False) -> int:
    """Bytes autograd saves for the InternViT tower on one tile when it trains (pixels included);
    checkpointed: each layer's input only."""
    per_token = s.v_hidden * e if checkpoint else 10 * s.v_hidden * e + 16 + 4 * s.v_heads + 2 * s.v_inter * e
    return 3 * s.tile * s.tile * e + s.v_layers * s.v_tokens * per_token


def projector_saved_per_tile(s: Shapes, e: int, checkpoint: bool = False) -> int:
    """Pixel-shuffled features through LayerNorm / Linear / GELU / Linear when the projector trains
    (checkpointed: its input only)."""
    return s.tile_tokens * (4 * s.v_hidden * e if checkpoint else 2 * 4 * s.v_hidden * e + 8 + 2 * s.proj_mid * e)


@dataclass
class Micro:
    """One micro-batch on one rank: its local tokens, labelled tokens and image tiles."""
    tokens: int
    labelled: int
    tiles: int


def stage_activations(s: Shapes, blocks: range, n_blocks: int, m: Micro, e: int, trainable, checkpoint: bool,
                      attention: str = "flash", tiled_mlp: bool = False, lora=None) -> int:
    """Bytes saved for backward by the blocks ``blocks`` of the pipeline (0: embedding + vision,
    1..n-2: decoder layers, n-1: head) for one micro-batch ``m``; ``lora``: ``model.lora`` (None: none).
    Adapters on the vision tower or the projector count that module as training plus each adapter's
    rank-wide output (approximate: its frozen norms keep less, the plan errs high there)."""
    from lvita.model.lora import adapted_groups

    groups = adapted_groups(lora)
    vision = "vision" in trainable or "vision" in groups
    projector = vision or "projector" in trainable or "projector" in groups
    adapted = adapted_of(trainable, lora)
    layers = [b for b in blocks if 0 < b < n_blocks - 1]
    # the first layer's input carries gradients unless it follows a frozen embedding on this stage
    # (a later pipeline stage's input always does: DeepSpeed's pipeline receives it with requires_grad)
    grad_in = 0 not in blocks or projector or "llm" in trainable
    total = 0
    if layers:
        if checkpoint:
            total += len(layers) * m.tokens * s.hidden * e + m.tokens * 8  # layer inputs + int64 positions
        else:
            total += layer_saved(s, m.tokens, e, attention, tiled_mlp, adapted, grad_in)
            total += (len(layers) - 1) * layer_saved(s, m.tokens, e, attention, tiled_mlp, adapted)
            total += 2 * m.tokens * s.head_dim * e  # rotary cos/sin, shared by the stage's layers
    if 0 in blocks:
        total += m.tokens  # image-token mask
        total += m.tokens * 8 if "llm" in trainable else 0  # embedding indices
        rank = lora.rank if lora is not None else 0
        if vision:
            total += m.tiles * vit_saved_per_tile(s, e, checkpoint)
            if "vision" in groups and not checkpoint:
                total += m.tiles * s.v_layers * s.v_tokens * 4 * rank * e  # qkv, proj, fc1, fc2 at most
        if projector:
            total += m.tiles * projector_saved_per_tile(s, e, checkpoint)
            if "projector" in groups and not checkpoint:
                total += m.tiles * s.tile_tokens * 2 * rank * e
    if n_blocks - 1 in blocks:
        normed = e * s.hidden if "llm" in trainable else 0  # the norm times its weight keeps it when that trains
        total += m.tokens * (4 * s.hidden + 4 + normed + 1)  # final RMSNorm, label mask
        total += m.labelled * (s.hidden * e + 12)  # labelled rows, targets, log-sum-exp
    return total


@dataclass
class StagePlan:
    stage: int
    parts: dict[str, int] = field(default_factory=dict)
    host: int = 0  # host memory the levers use (offloaded optimizer states and activations)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    stages: list[StagePlan]
    micro: Micro
    levers: list[str]
    engine: str = "pipeline"  # lvita.config.zero_memory.engine_of
    zero_stage: int = 0
    shards: int = 1  # DeepSpeed's data-parallel group (data x sequence ranks) that ZeRO shards over
    # the ZeRO engine builds the whole model in fp32 on each GPU before DeepSpeed partitions it (no zero.Init:
    # lvita.parallel.zero): a start-up peak of every parameter x 4 bytes plus the CUDA context; 0 on the pipeline
    startup: int = 0

    def engine_text(self) -> str:
        what = "pipeline engine" if self.engine == "pipeline" else "ZeRO engine (plain model)"
        return f"{what}, ZeRO-{self.zero_stage} over {self.shards} data x sequence ranks"

    @property
    def bound(self) -> StagePlan:
        return max(self.stages, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        """The run's peak GPU memory: the bounding stage's, or the ZeRO engine's start-up when higher."""
        return max(self.bound.total, self.startup)

    def fits(self, gpu_gb: float) -> bool:
        return self.peak <= gpu_gb * GIB


def levers_of(cfg) -> list[str]:
    m = cfg.model
    return [name for name, on in (("activation checkpointing", m.activation_checkpointing),
                                  ("tiled MLP", m.tiled_mlp), ("activation offload", m.activation_offload),
                                  ("optimizer offload", cfg.train.optimizer_offload),
                                  ("param offload", getattr(cfg.train, "param_offload", False))) if on]


def worst_micro(cfg, layout) -> Micro:
    """One rank's micro-batch at its largest: every local token labelled, image tokens filling it."""
    s = Shapes.of(cfg.model.spec())
    tokens = layout.micro_batch * cfg.data.seq_length // layout.sequence
    return Micro(tokens, tokens, math.ceil(tokens / s.tile_tokens) + layout.micro_batch)


def memory_plan(cfg, layout, rows: list[dict], micro: Micro | None = None, attention: str = "flash",
                zero: Zero | None = None) -> Plan:
    """Predicted peak GPU memory per pipeline stage; ``rows``: lvita.config.check.stage_table's (blocks and
    parameter counts per stage); ``zero``: the ZeRO settings (default: read from ``cfg.deepspeed``)."""
    s, m, t = Shapes.of(cfg.model.spec()), micro or worst_micro(cfg, layout), cfg.train
    e = 2 if cfg.precision == "bf16" else 4
    zero = zero or zero_of(cfg)
    shards = layout.world // layout.pipeline  # DeepSpeed's data axis: data x sequence ranks
    param_offload = getattr(t, "param_offload", False) and zero.stage == 3
    n_blocks, ckpt = s.layers + 2, cfg.model.activation_checkpointing
    adapted = adapted_of(cfg.model.trainable, cfg.model.lora)
    stages = []
    for r in rows:
        blocks = range(r["first"], r["last"] + 1)
        p = StagePlan(r["stage"])
        states, p.host = model_states(r, zero, shards, cfg.precision, t.optimizer_offload, param_offload)
        buffers = states.pop("zero buffers")
        p.parts.update(states)
        in_flight = max(1, min(layout.pipeline - r["stage"], layout.grad_accum))
        act = stage_activations(s, blocks, n_blocks, m, e, cfg.model.trainable, ckpt, attention, cfg.model.tiled_mlp,
                                cfg.model.lora)
        p.parts["activations"] = act * in_flight
        layers = [b for b in blocks if 0 < b < n_blocks - 1]
        if cfg.model.activation_offload and ckpt and layers:  # layer inputs wait on the host, the newest excepted
            moved = len(layers) * m.tokens * s.hidden * e * in_flight - m.tokens * s.hidden * e
            p.parts["activations"] -= moved
            p.host += moved
        working = 0
        if layers:  # one layer recomputed (if checkpointed), its gradients, the MLP's gradients
            working = (layer_saved(s, m.tokens, e, attention, cfg.model.tiled_mlp, adapted) if ckpt else 0)
            mlp = min(m.tokens, s.hidden) * 6 * s.inter * e if cfg.model.tiled_mlp else m.tokens * 2 * s.inter * e
            working += 3 * m.tokens * s.hidden * e + mlp
        if 0 in blocks:  # the tower's largest layer over all tiles (forward; or recomputed in backward)
            vit = m.tiles * s.v_tokens * (4 * s.v_hidden + s.v_inter) * e
            if "vision" in cfg.model.trainable and ckpt:
                vit = m.tiles * s.v_tokens * (10 * s.v_hidden * e + 16 + 4 * s.v_heads + 2 * s.v_inter * e) * 2
            working = max(working, vit)
        if n_blocks - 1 in blocks:
            rows_ = m.labelled if cfg.model.logits_chunk == 0 else min(cfg.model.logits_chunk, m.labelled)
            working = max(working, rows_ * s.vocab * (4 + e))
        p.parts["largest transient"] = working
        comm = 0
        if layout.pipeline > 1 and r["stage"] < layout.pipeline - 1:
            comm += in_flight * m.tokens * s.hidden * e  # outputs kept for the next stage's gradients
        if layout.ulysses > 1 and layers:
            comm += 2 * m.tokens * (s.q + 2 * s.kv) * e  # all-to-all send and receive
        if layout.ring > 1 and layers:  # lvita's ring kernel (KV expanded to the query heads) in backward: the fp32
            comm += m.tokens * s.q * (4 + 16 + 4 * e)  # dq, travelling + received fp32 dk/dv, sent + received k/v
        p.parts["communication"] = comm
        p.parts["ZeRO buffers"] = buffers
        p.parts["CUDA context"] = OVERHEAD
        stages.append(p)
    engine = engine_of(cfg, zero)
    startup = 0 if engine == "pipeline" else sum(r["params"] for r in rows) * 4 + OVERHEAD
    return Plan(stages, m, levers_of(cfg), engine, zero.stage, shards, startup)


def describe(plan: Plan, gpu_gb: float) -> list[str]:
    """Lines for lvita check: one per stage, then the bound and the verdict."""
    gib = lambda b: f"{b / GIB:,.1f}"  # noqa: E731
    out = [f"  memory plan per GPU ({plan.micro.tokens:,} local tokens, {plan.micro.tiles:,} tiles at most; "
           f"levers: {', '.join(plan.levers) or 'none'}; {plan.engine_text()}), GiB:"]
    keys = list(plan.stages[0].parts)
    out.append("    stage " + "".join(f"{k[:11]:>12}" for k in keys) + f"{'total':>9}" + f"{'host':>8}")
    for p in plan.stages:
        out.append(f"    {p.stage:>5} " + "".join(f"{gib(p.parts[k]):>12}" for k in keys) + f"{gib(p.total):>9}"
                   + f"{gib(p.host):>8}")
    b = plan.bound
    verdict = "fits" if plan.fits(gpu_gb) else "does NOT fit"
    if plan.startup:
        out.append(f"  start-up: the ZeRO engine builds the whole model in fp32 on each GPU before partitioning it: "
                   f"{gib(plan.startup)} GiB with the CUDA context"
                   + (f" (more than the {gib(b.total)} GiB of training)" if plan.startup > b.total else ""))
    what = f"stage {b.stage} bounds the run" if plan.peak == b.total else "the start-up bounds the run"
    out.append(f"  {what} at {gib(plan.peak)} GiB: {verdict} {gpu_gb:g} GB GPUs"
               + ("" if plan.fits(gpu_gb) else " (lvita check --suggest lists layouts and levers that do)"))
    return out
