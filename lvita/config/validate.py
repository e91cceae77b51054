"""Up-front checks of a stage against a world size, before anything heavy is built.

Owns the parallel layout arithmetic and every "this cannot work" message. :func:`validate`
returns a :class:`Layout` or raises :class:`~lvita.config.ConfigError` listing *all* problems,
each naming the key and the fix. Paths that the user fills in (data, tokenizer, init_from) are
collected separately as ``missing`` so ``lvita check`` can report them without failing.

Layout: world = pipeline x data x sequence, sequence = ulysses x ring. DeepSpeed's pipeline
engine knows only pipe and data axes, so it sees world / pipeline "data" ranks; the global batch
is cut into micro-batches of ``train.micro_batch`` over the true data-parallel ranks.

Also owns the DeepSpeed JSON: batch sizes, precision, clipping come from the stage file and are
cross-checked against the DeepSpeed file (equal or absent), never silently duplicated; so are the
offloads (train.optimizer_offload, train.param_offload). Its ZeRO stage picks the engine: 0-1 the
pipeline engine at any pipeline degree, 2-3 the ZeRO engine (lvita.parallel.zero) at pipeline 1 only.
"""
from __future__ import annotations

import functools

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvita.config.schema import MODULES, RECORD_SCHEMAS, ConfigError, StageConfig, parse_duration
from lvita.config.shipped import ds_config_names
from lvita.model.attention import packed_kernels
from lvita.model.presets import PRESETS, llm_config


@dataclass
class Layout:
    world: int
    pipeline: int
    ulysses: int
    ring: int
    data: int  # true data-parallel ranks (distinct samples)
    micro_batch: int
    grad_accum: int  # micro-batches per rank per step
    global_batch: int
    missing: list[str] = field(default_factory=list)  # user-filled paths that do not exist yet
    notes: list[str] = field(default_factory=list)

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring


def _exists(path: str | None) -> bool:
    return path is not None and Path(path).exists()


# what model.init_from can load: an HF directory's weights, or an lvita checkpoint's per-block files (in the
# output_dir's checkpoints/<tag>/, a checkpoints/ directory's <tag>/, or the tag itself)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "layer_*-model_states.pt")


def holds_weights(path: Path, depth: int = 2) -> bool:
    """Whether a directory has weight files at most ``depth`` folders down (a file path: itself)."""
    if path.is_file():
        return True
    if any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        return True
    return depth > 0 and any(holds_weights(d, depth - 1) for d in sorted(path.iterdir()) if d.is_dir())


def validate(cfg: StageConfig, world_size: int) -> Layout:
    errors: list[str] = []
    missing: list[str] = []
    err = errors.append
    p, t, m, d = cfg.parallel, cfg.train, cfg.model, cfg.data

    if cfg.precision not in ("bf16", "fp32"):
        err(f"precision='{cfg.precision}': use 'bf16' (GPUs) or 'fp32' (CPU tests)")
    try:
        spec = m.spec()
    except ValueError as e:
        err(f"model.preset='{m.preset}': choose one of {', '.join(PRESETS)}, or a model directory whose config.json "
            f"gives the shapes (the released Long-VITA layout or InternVL's) ({e})")
        raise ConfigError(_fmt(cfg, errors))
    lcfg = llm_config(spec)
    bad = [x for x in m.trainable if x not in MODULES]
    if bad or (not m.trainable and m.lora is None):
        err(f"model.trainable={m.trainable}: a non-empty subset of {list(MODULES)}"
            + (f" (or [] with model.lora)" if bad else ", or [] with model.lora (only adapters train)"))
    for x in m.trainable:
        if x in MODULES and x not in t.lr:
            err(f"train.lr has no rate for trainable module '{x}'; add \"{x}\": <lr> to train.lr")
    for line in _lora_errors(m, t, spec):
        err(line)
    for x in t.lr:
        if x not in MODULES:
            err(f"train.lr.{x}: unknown module; use {list(MODULES)}")
    if m.activation_offload and not m.activation_checkpointing:
        err("model.activation_offload=true moves the checkpointed layer inputs to host memory; set "
            "model.activation_checkpointing=true as well")
    if m.logits_chunk < 0:
        err(f"model.logits_chunk={m.logits_chunk}: labelled tokens per chunk of the LM-head logits "
            f"(default 8192), or 0 for logits at every position (memory grows with sequence x vocabulary)")

    for key in ("pipeline", "ulysses", "ring"):
        if getattr(p, key) < 1:
            err(f"parallel.{key}={getattr(p, key)}: must be >= 1")
    n_specs = lcfg.num_hidden_layers + 2
    if p.pipeline > n_specs:
        err(f"parallel.pipeline={p.pipeline} exceeds the {n_specs} pipeline layers of {m.preset}")
    model_ranks = max(p.pipeline, 1) * max(p.sequence, 1)
    dp = world_size // model_ranks if model_ranks else 0
    if world_size % model_ranks:
        err(f"parallel.pipeline x ulysses x ring = {p.pipeline}x{p.ulysses}x{p.ring} = {model_ranks} does "
            f"not divide the world size {world_size}; change the degrees or the number of processes")
    if p.ulysses > 1 and lcfg.num_attention_heads % p.ulysses:
        err(f"parallel.ulysses={p.ulysses} must divide the {lcfg.num_attention_heads} query heads of {m.preset}")
    if p.ulysses > 1 and lcfg.num_key_value_heads % p.ulysses and p.ulysses % lcfg.num_key_value_heads:
        err(f"parallel.ulysses={p.ulysses} and the {lcfg.num_key_value_heads} KV heads of {m.preset}: one "
            f"must divide the other")
    if p.sequence > 1 and t.micro_batch != 1:
        err(f"train.micro_batch={t.micro_batch}: sequence parallelism takes one packed sequence per "
            f"micro-batch; set train.micro_batch=1 (raise train.global_batch for more accumulation)")
    if p.ring > 1 and d.reset_position_ids:
        err(f"parallel.ring={p.ring} with data.reset_position_ids=true: the ring kernels have no varlen path, "
            f"so packed samples would attend to each other; use parallel.ulysses for reset-packed stages "
            f"(Ulysses keeps samples apart), or set data.reset_position_ids=false")
    if d.reset_position_ids and not packed_kernels():
        err(f"data.reset_position_ids=true packs samples that must not attend to each other, and torch "
            f"{torch.__version__} offers no kernel for it (flash-attn does not import; torch's varlen_attn with "
            f"scale/window_size needs torch >= 2.11; no scaled_dot_product_attention): install flash-attn or a "
            f"torch in the range pyproject.toml names, or set data.reset_position_ids=false")
    if p.sequence > 1 and d.seq_length % (2 * p.sequence):
        err(f"data.seq_length={d.seq_length} must be a multiple of 2 x sequence degree = {2 * p.sequence}")

    gas = 0
    if t.micro_batch < 1 or t.global_batch < 1:
        err("train.micro_batch and train.global_batch must be >= 1")
    elif dp and t.global_batch % (t.micro_batch * dp):
        err(f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch x data-parallel "
            f"ranks = {t.micro_batch} x {dp} = {t.micro_batch * dp} (data-parallel ranks = world {world_size} "
            f"/ (pipeline {p.pipeline} x sequence {p.sequence}))")
    elif dp:
        gas = t.global_batch // (t.micro_batch * dp)
    if t.iterations < 1:
        err(f"train.iterations={t.iterations}: must be >= 1")
    notes: list[str] = []
    if t.warmup_steps < 0:
        err(f"train.warmup_steps={t.warmup_steps}: must be >= 0 (0: no warmup)")
    elif t.warmup_steps > t.iterations >= 1:
        notes.append(f"train.warmup_steps={t.warmup_steps} is longer than train.iterations={t.iterations}: the run "
                     f"ends during warmup (LR at step t = t/{t.warmup_steps} of train.lr, last step "
                     f"{t.iterations}/{t.warmup_steps})")
    if t.save_every < 0:
        err(f"train.save_every={t.save_every}: 0 (only at the end) or a positive step count")
    if t.memory_cap_gb is not None and t.memory_cap_gb <= 0:
        err(f"train.memory_cap_gb={t.memory_cap_gb}: GiB per process (e.g. 80), or null for no cap")
    if not 0 <= t.min_lr_ratio <= 1:
        err(f"train.min_lr_ratio={t.min_lr_ratio}: between 0 and 1")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        err(f"train.peak_tflops={t.peak_tflops}: the GPU's dense bf16 peak in TFLOPs (e.g. 989 for an H100 SXM), "
            f"or null to look the GPU up")
    if len(t.adam_betas) != 2:
        err(f"train.adam_betas={t.adam_betas}: two numbers, e.g. [0.9, 0.999]")

    if not Path(cfg.deepspeed).is_file():
        err(f"deepspeed='{cfg.deepspeed}': file not found (relative to the working directory); point it at a "
            f"DeepSpeed JSON or name a shipped one: {', '.join(ds_config_names())}")
    else:
        try:
            deepspeed_config(cfg, micro=t.micro_batch, gas=max(gas, 1), ds_data_ranks=world_size // p.pipeline)
        except ConfigError as e:
            err(str(e))

    if m.tokenizer is None:
        err("model.tokenizer is not set: a directory with HF tokenizer files (e.g. Qwen2.5-14B-Instruct)")
    elif not _exists(m.tokenizer):
        missing.append(f"model.tokenizer: {m.tokenizer}")
    for path in [m.init_from] if isinstance(m.init_from, str) else m.init_from or []:
        if not _exists(path):
            missing.append(f"model.init_from: {path} (the previous stage's output_dir or an HF model directory)")
        elif not holds_weights(Path(path)):
            missing.append(f"model.init_from: {path} exists but holds no weights (no *.safetensors, "
                           f"pytorch_model*.bin or checkpoint layer_*-model_states.pt): has the previous stage saved?")
    if isinstance(m.init_from, list) and len(m.init_from) != 2:
        err(f"model.init_from={m.init_from}: a list must hold two HF directories, [InternViT, Qwen2]")
    random_frozen(m, err, missing)
    if t.loss_reduction not in ("token", "sequence"):
        err(f"train.loss_reduction={t.loss_reduction!r}: \"sequence\" (the official Megatron loss: the token mean of "
            f"each packed sequence, averaged over the global batch's sequences) or \"token\" (the mean over every "
            f"labelled token of the global batch)")
    if t.vision_lr_decay is not None:
        v = t.vision_lr_decay
        if set(v) != {"factor", "scale"} or not 0 < v["factor"] <= 1 or v["scale"] <= 0:
            err(f"train.vision_lr_decay={v}: {{\"factor\": F, \"scale\": S}} with 0 < F <= 1 and S > 0 (Long-VITA "
                f"stage 2: {{\"factor\": 0.9, \"scale\": 0.1}}), or null for a flat train.lr.vision")
    if cfg.resume not in ("auto", "none") and not _exists(cfg.resume):
        missing.append(f"resume: {cfg.resume} (auto, none, or a checkpoint: output_dir, checkpoints/ or a tag in it)")
    if t.keep_checkpoints < 0:
        err(f"train.keep_checkpoints={t.keep_checkpoints}: 0 (keep all) or how many of the newest to keep")
    if t.max_nonfinite_steps < 1:
        err(f"train.max_nonfinite_steps={t.max_nonfinite_steps}: stop after this many non-finite steps in a row (>= 1)")
    try:
        parse_duration(t.time_limit)
    except ConfigError as e:
        err(str(e))

    if d.same_source not in (True, False, "file"):
        err(f"data.same_source={d.same_source!r}: true (a sequence packs one source), \"file\" (one data file, as the "
            f"official loader without --cross-dataset-joint) or false (any mix)")
    if not 1 <= d.min_tiles <= d.max_tiles:
        err(f"data.min_tiles={d.min_tiles}, data.max_tiles={d.max_tiles}: need 1 <= min_tiles <= max_tiles")
    for key in ("max_images", "max_frames", "pack_buffer", "workers", "prefetch"):
        if getattr(d, key) < 1:
            err(f"data.{key}={getattr(d, key)}: must be >= 1")
    if d.video_fps <= 0:
        err(f"data.video_fps={d.video_fps}: must be > 0")
    if not 0 <= d.max_skip_fraction <= 1:
        err(f"data.max_skip_fraction={d.max_skip_fraction}: a fraction between 0 and 1")
    if d.seq_length < 16:
        err(f"data.seq_length={d.seq_length}: too short")
    if not d.sources:
        err("data.sources is empty: list at least one source with name, paths and ratio")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not s.name:
            err(f"{key}.name is empty")
        if names.count(s.name) > 1:
            err(f"{key}.name='{s.name}' appears twice; source names must be unique")
        if s.ratio < 0:
            err(f"{key}.ratio={s.ratio}: must be >= 0 (a fraction of the source per pass; > 1 repeats)")
        if not s.paths:
            err(f"{key}.paths is empty")
        if s.format not in RECORD_SCHEMAS:
            err(f"{key}.format='{s.format}': unknown record format; use one of {', '.join(RECORD_SCHEMAS)}")
        for path in (s.paths if s.ratio > 0 else []):
            full = Path(path) if Path(path).is_absolute() else Path(d.root) / path
            if not (glob.glob(str(full)) if glob.has_magic(str(full)) else full.exists()):
                missing.append(f"{key} ({s.name}): {full}")
        if s.media_root is not None and s.ratio > 0:
            full = Path(s.media_root) if Path(s.media_root).is_absolute() else Path(d.root) / s.media_root
            if not full.is_dir():
                missing.append(f"{key}.media_root ({s.name}): {full}")
    if d.sources and all(s.ratio == 0 for s in d.sources):
        err("every data source has ratio 0: nothing to train on")

    if errors:
        raise ConfigError(_fmt(cfg, errors))
    return Layout(world_size, p.pipeline, p.ulysses, p.ring, dp, t.micro_batch, gas, t.global_batch,
                  missing, notes)


def random_frozen(m, err, missing) -> None:
    """A module that ``model.trainable`` freezes and ``model.init_from`` never loads would stay random for the
    whole stage (stage 1 aligning a projector to noise): listed with the paths to fill in when init_from is
    unset, an error when the list form [InternViT, Qwen2] leaves the frozen projector random; neither with
    ``model.allow_random_frozen``."""
    if m.allow_random_frozen:
        return
    loaded = set(MODULES) if isinstance(m.init_from, str) else {"vision", "llm"} if m.init_from else set()
    random = [mod for mod in MODULES if mod not in m.trainable and mod not in loaded]
    if not random:
        return
    what = (f"model.trainable={m.trainable} freezes {', '.join(random)}, which would stay random for the whole "
            f"stage")
    if m.init_from is None:
        missing.append(f"model.init_from: not set, but {what}; name the pretrained weights "
                       f"([InternViT-300M-448px dir, Qwen2.5-14B-Instruct dir]) or the previous stage's output_dir "
                       f"(model.allow_random_frozen: true trains anyway, as the demo does)")
    else:
        err(f"model.init_from={m.init_from} (InternViT + Qwen2) leaves the projector random, but {what}; train the "
            f"projector, start from a checkpoint that has one, or set model.allow_random_frozen: true")


def _fmt(cfg: StageConfig, errors: list[str]) -> str:
    head = f"{cfg.source_file or 'stage config'}: {len(errors)} problem(s)"
    return f"{head}: " + "; ".join(errors)  # one line: the entry points print it as one


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
OWNED_SECTIONS = ("optimizer", "scheduler")


def deepspeed_config(cfg: StageConfig, micro: int, gas: int, ds_data_ranks: int) -> dict:
    """The DeepSpeed JSON of ``cfg.deepspeed`` with batch sizes, precision and clipping filled in
    from the stage file; values present in both must agree."""
    try:
        ds = json.loads(Path(cfg.deepspeed).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg.deepspeed}: not valid JSON ({e})") from None
    want = {"train_batch_size": micro * gas * ds_data_ranks, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas, "gradient_clipping": cfg.train.grad_clip}
    for key, value in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{cfg.deepspeed}: '{key}'={ds[key]} disagrees with the stage file ({value}, from "
                              f"train.global_batch/micro_batch/grad_clip); remove it from the DeepSpeed JSON")
        ds[key] = value
    for section in OWNED_SECTIONS:
        if section in ds:
            raise ConfigError(f"{cfg.deepspeed}: remove the '{section}' section; lvita builds the optimizer and "
                              f"LR schedule from train.lr / warmup_steps / weight_decay so they are per module")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{cfg.deepspeed}: fp16 is not supported; use precision=bf16")
    bf16 = ds.get("bf16", {}).get("enabled")
    if bf16 is not None and bf16 != (cfg.precision == "bf16"):
        raise ConfigError(f"{cfg.deepspeed}: bf16.enabled={bf16} disagrees with precision='{cfg.precision}'; "
                          f"drop bf16.enabled from the DeepSpeed JSON and set precision in the stage file")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{cfg.deepspeed}: zero_optimization.stage={stage}; use 0, 1, 2 or 3")
    if stage >= 2 and cfg.parallel.pipeline > 1:
        raise ConfigError(f"{cfg.deepspeed}: zero_optimization.stage={stage} with parallel.pipeline="
                          f"{cfg.parallel.pipeline}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1; set "
                          f"parallel.pipeline=1 (ZeRO-2/3 on the plain model) or use a ZeRO-1 config "
                          f"(ds_configs/pipeline_*.json)")
    for key, stage_key in (("offload_optimizer", "train.optimizer_offload"), ("offload_param", "train.param_offload")):
        if key in zero:
            raise ConfigError(f"{cfg.deepspeed}: remove zero_optimization.{key}; set {stage_key} in the stage file"
                              + (" (lvita then also uses DeepSpeed's CPU Adam)" if key == "offload_optimizer" else ""))
    if cfg.train.optimizer_offload:
        if stage < 1:
            raise ConfigError(f"train.optimizer_offload=true needs ZeRO stage 1, 2 or 3 in {cfg.deepspeed} (it has "
                              f"{stage})")
        zero = {**zero, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    if cfg.train.param_offload:
        if stage != 3:
            raise ConfigError(f"train.param_offload=true needs ZeRO stage 3 in {cfg.deepspeed} (it has {stage}; "
                              f"ds_configs/zero3_*.json) and parallel.pipeline=1")
        zero = {**zero, "offload_param": {"device": "cpu", "pin_memory": True}}
    if zero:
        ds["zero_optimization"] = zero
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _lora_errors(m, t, spec) -> list[str]:
    """``model.lora``: sane numbers, targets that name linear layers, no module both adapted and fully trained,
    a learning rate for every adapted module (its adapters train at ``train.lr.<module>``)."""
    lora = m.lora
    if lora is None:
        return []
    from lvita.model.lora import adapted_groups

    out = []
    if lora.rank < 1:
        out.append(f"model.lora.rank={lora.rank}: the adapters' rank, at least 1 (8-64 is usual)")
    if lora.alpha <= 0:
        out.append(f"model.lora.alpha={lora.alpha}: the adapters' scale is alpha / rank; use a positive number")
    if not 0 <= lora.dropout < 1:
        out.append(f"model.lora.dropout={lora.dropout}: a probability in [0, 1)")
    groups = adapted_groups(lora)
    if not groups:
        out.append("model.lora names no linear layer (llm, vision and projector are all []); set model.lora.llm, "
                   "or model.lora=null for full fine-tuning")
    for g in groups:
        if g in m.trainable:
            out.append(f"model.lora.{g} adapts the {g}, which model.trainable={m.trainable} also trains in full; "
                       f"drop '{g}' from model.trainable (its adapters train) or set model.lora.{g}=[]")
        if g not in t.lr:
            out.append(f"train.lr has no rate for the {g}'s adapters; add \"{g}\": <lr> to train.lr (1e-4 is usual)")
    error = _target_error(spec, tuple(lora.vision), tuple(lora.projector), tuple(lora.llm))
    return out + ([error] if error else [])


@functools.lru_cache(maxsize=16)
def _target_error(spec, vision: tuple, projector: tuple, llm: tuple) -> str | None:
    """check_targets on meta-device blocks, once per model and targets (``lvita check --suggest`` validates
    hundreds of candidates; building the 14B blocks takes seconds)."""
    import types

    from lvita.model.longvita import build_blocks
    from lvita.model.lora import check_targets

    try:
        with torch.device("meta"):
            check_targets(build_blocks(spec, 0, 0), types.SimpleNamespace(vision=list(vision),
                                                                          projector=list(projector), llm=list(llm)))
    except ConfigError as e:
        return str(e)
    return None
