"""Stage configuration: one JSON file per training stage -> typed dataclasses.

This module owns the single source of truth for a run. A stage file (``stages/*/*.json``) is
read, ``--set dotted.key=value`` overrides are applied to the raw dict, and the result becomes
:class:`StageConfig`. Unknown keys are errors that name the file and the dotted key; so are
values of the wrong type. Checks that need the world size (parallel layout, batch arithmetic)
live in :mod:`lvita.config.validate`, which runs before anything heavy is built.

    from lvita.config.schema import load_stage
    cfg = load_stage("stages/demo/2_general.json", ["parallel.pipeline=2"])

Trade-off: plain dataclasses and a small hand-written converter instead of pydantic, so the
error messages are ours and there is no extra dependency.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvita.config.shipped import find_ds_config, find_stage
from lvita.errors import ConfigError  # noqa: F401 - defined there (the model presets raise it too), used here


MODULES = ("vision", "projector", "llm")
# model.format: a name of lvita.model.formats.MODEL_FORMATS (the released Long-VITA architecture and input
# layout, or InternVL's projector and layout, the transformers-native export); parsed there


def _llm_linears() -> list[str]:
    from lvita.model.lora import LLM_LINEARS  # imported when needed: it brings transformers' Qwen2 layers

    return list(LLM_LINEARS)


@dataclass
class LoraConfig:
    """``model.lora``: low-rank adapters (PEFT's LoRA, lvita.model.lora) on the named linear layers of each module;
    the adapted weights stay frozen in the run's precision (no fp32 master, no optimizer state)."""
    rank: int = 16
    alpha: float = 32.0  # the adapters' output is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapters' input (PEFT's lora_dropout); 0 keeps every layout's losses equal
    # linear layers adapted, per module, by name ("q_proj"; within the projector its path, "mlp.0" or "linear_1")
    # or "all" (every linear of the module but the LM head); []: that module gets no adapters
    llm: list[str] = field(default_factory=_llm_linears)
    vision: list[str] = field(default_factory=list)
    projector: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    # a name in lvita/model/presets.py, a model directory whose config.json gives the shapes (the released
    # Long-VITA layout or InternVL's), or [InternViT directory, Qwen2 directory]
    preset: str | list[str] = "tiny"
    # a name of lvita.model.formats.MODEL_FORMATS. null (the default): the preset's own format, filled in by
    # load_stage: the longvita-* presets and directories in the released layout -> "longvita"; InternVL
    # directories and the tiny preset -> "internvl" (today's tiny/demo behaviour)
    format: str | None = None
    tokenizer: str | None = None  # directory with tokenizer files (HF format)
    # previous stage's output_dir / checkpoints / tag (any layout), an InternVL HF directory, or
    # [InternViT HF dir, Qwen2 HF dir] (the projector then starts fresh)
    init_from: str | list[str] | None = None
    # modules trained in full (fp32 master weights and Adam states for each of their parameters). null (the
    # default): every module, or under model.lora none (only the adapters train)
    trainable: list[str] | None = None
    lora: LoraConfig | None = None  # null: full fine-tuning of model.trainable; an object: LoRA adapters train too
    # a module that neither trains nor loads weights (init_from) stays random for the whole stage: an error
    # (lvita.training.loop) unless this is true (the demo's tiny models, smoke tests)
    allow_random_frozen: bool = False
    activation_checkpointing: bool = False
    # labelled tokens per chunk of the training loss's LM-head logits (lvita.model.lm_head): the
    # loss holds chunk x vocab logits at a time, never sequence x vocab; 0: logits for every position
    logits_chunk: int = 8192
    # memory levers (lvita.training.levers), applied from outside the model: each decoder MLP runs over
    # sequence shards of `hidden` tokens, recomputed in backward (DeepSpeed ALST's TiledMLP) ...
    tiled_mlp: bool = False
    # ... and the checkpointed layer inputs wait in host memory (DeepSpeed's cpu_checkpointing)
    activation_offload: bool = False

    def __post_init__(self):
        if self.trainable is None:
            self.trainable = [] if self.lora is not None else list(MODULES)

    def spec(self):
        """The model's description (shapes + format, lvita.model.presets.ModelSpec); build it once per
        run and pass it down. ValueError when the preset is neither a known name nor a model directory."""
        from lvita.model.presets import spec_of

        return spec_of(self.preset, self.format)


@dataclass
class TrainConfig:
    iterations: int = 10
    global_batch: int = 2
    micro_batch: int = 1
    lr: dict[str, float] = field(default_factory=lambda: {"vision": 1e-5, "projector": 1e-3, "llm": 1e-5})
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    # vision encoder layer-wise LR decay, as Long-VITA's Megatron optimizer (long_vita_megatron/core/optimizer):
    # {"factor": 0.9, "scale": 0.1} gives a vision parameter of layer l (1..L; 0 = patch/position embeddings,
    # L+1 = anything after the layers) lr.vision x scale x factor^(L + 1 - l). null: lr.vision flat
    vision_lr_decay: dict[str, float] | None = None
    # "token": the mean over every labelled token of the global batch; "sequence" (the official Megatron
    # loss): the token mean within each packed sequence, then the mean over the global batch's sequences
    loss_reduction: str = "token"
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    optimizer_offload: bool = False  # ZeRO-Offload: fp32 master weights and Adam states in host memory
    # ZeRO-3 parameter offload (zero_optimization.offload_param, injected by lvita.config.validate): the bf16/fp32
    # weights' shards in host memory, fetched for each module's forward and backward. ZeRO stage 3 only
    param_offload: bool = False
    grad_clip: float = 1.0
    save_every: int = 0  # 0: only at the end
    save_final: bool = True  # false: no checkpoint at the last step (benchmarks, smoke runs); stops still save
    keep_checkpoints: int = 0  # keep the newest K complete checkpoints (0: all)
    max_nonfinite_steps: int = 5  # stop (exit 2) after this many non-finite steps in a row (lvita.training.guard)
    time_limit: str | None = None  # e.g. "47h30m": save and exit 0 before then (lvita.training.stopping)
    log_every: int = 1
    peak_tflops: float | None = None  # the GPU's dense bf16 peak for MFU (None: lvita.model.flops' table)
    # GiB (2**30 bytes) each process may use, e.g. 80 to measure for 80 GB GPUs on a larger one: CUDA's
    # allocator refuses more (torch.cuda.set_per_process_memory_fraction); on CPU the peak resident set is
    # checked after each step. Either way the run ends with torch.OutOfMemoryError. None: no cap
    memory_cap_gb: float | None = None


@dataclass
class ParallelConfig:
    pipeline: int = 1
    ulysses: int = 1
    ring: int = 1
    partition_method: str = "parameters"  # DeepSpeed PipelineModule partition_method

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring


RECORD_SCHEMAS = ("auto", "messages", "sharegpt", "cauldron", "instruction", "lima")  # data.sources[].format


@dataclass
class SourceConfig:
    name: str = ""
    # JSONL / JSON-array / parquet / arrow files, globs, directories of them, or a Hugging Face
    # dataset directory (save_to_disk or a downloaded repository), relative to data.root
    paths: list[str] = field(default_factory=list)
    ratio: float = 1.0  # fraction of the source used per pass; > 1 repeats it
    max_samples: int | None = None  # cap after the ratio
    # ratio and max_samples apply to each file of the source (min(int(ratio x records_f), max_samples) from
    # file f per pass), as the official loader (long_vita/data/dataset_base.py) does; false: to the source
    per_file: bool = False
    total: str | None = None  # informative: size quoted in the paper (Table 1)
    # record schema (RECORD_SCHEMAS; read by lvita.data.formats): auto (detected per record) | messages | sharegpt |
    # cauldron | instruction | lima
    format: str = "auto"
    media_root: str | None = None  # image/video folder, relative to data.root; default: each data file's folder

    def sampling(self) -> str:
        """How the source is sampled per pass, in words (``lvita check``, ``lvita data check``)."""
        cap = f", at most {self.max_samples:,} records" if self.max_samples is not None else ""
        return f"ratio {self.ratio:g} of {'each file' if self.per_file else 'the source'}{cap} per pass"


@dataclass
class DataConfig:
    root: str = "."
    seq_length: int = 1024
    reset_position_ids: bool = True  # stages 1-2: restart positions and attention per sample
    # true: a sequence packs samples of one source; "file": of one data file (the official loader without
    # --cross-dataset-joint); false: any mix
    same_source: bool | str = True
    max_images: int = 128  # images per sample (more: the sample is skipped)
    min_tiles: int = 1  # InternVL dynamic tiling: tiles per image between these (plus a thumbnail)
    max_tiles: int = 12
    max_frames: int = 128  # frames per video (one tile each), sampled at most video_fps per second
    video_fps: float = 1.0
    # added to samples without a system turn; "": none. Unset under model.format longvita: none (as released)
    system_prompt: str = "You are a helpful assistant."
    pack_buffer: int = 256  # pending samples the packer chooses from (token lists only, no pixels)
    workers: int = 2  # threads decoding this rank's images and videos
    prefetch: int = 2  # global batches prepared ahead of the training loop
    max_skip_fraction: float = 0.05  # stop when more bad samples than this are skipped
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class StageConfig:
    name: str = "stage"
    output_dir: str = "runs/stage"
    seed: int = 42
    precision: str = "bf16"  # bf16 | fp32
    deepspeed: str = "ds_configs/pipeline_bf16_zero1.json"
    resume: str = "auto"  # auto: newest complete checkpoint in output_dir | a checkpoint path | none
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    description: str = ""
    source_file: str = ""  # set by load_stage: where this config came from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# dict -> dataclass, with errors that name the key


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return {k: _check_type(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _from_dict(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source_file"]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{key}'; valid keys here: {', '.join(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=1`` -> (["a", "b"], 1). The value is JSON when it parses, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.iterations=3")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.strip().split("."), value


def apply_override(raw: dict, item: str) -> None:
    path, value = parse_override(item)
    node, cls = raw, StageConfig
    for i, part in enumerate(path):
        dotted = ".".join(path[: i + 1])
        if cls is not None:
            valid = [f.name for f in dataclasses.fields(cls) if f.name != "source_file"]
            if part not in valid:
                raise ConfigError(f"--set {item}: unknown key '{dotted}'; valid keys: {', '.join(valid)}")
            tp = typing.get_type_hints(cls)[part]
            cls = tp if dataclasses.is_dataclass(tp) else None
        if i == len(path) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{dotted}' is not an object")


def load_stage(path: str | Path, overrides: list[str] | None = None) -> StageConfig:
    """Read a stage JSON, apply ``--set`` overrides, and return the typed config."""
    path = find_stage(path)  # a file, or a shipped stage by name (lvita.config.shipped)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"stage file {path}: cannot read it ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        cfg = _from_dict(StageConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.source_file = str(path)
    cfg.deepspeed = find_ds_config(cfg.deepspeed)  # a file there, else the shipped config of that name
    fmt = resolve_model_format(cfg.model, str(path))
    if fmt is not None and not fmt.default_system_prompt and "system_prompt" not in (raw.get("data") or {}):
        cfg.data.system_prompt = ""  # released Long-VITA trains with no default system prompt
    return cfg


def resolve_model_format(model: ModelConfig, where: str = ""):
    """Check ``model.format`` (naming the valid values) and fill in the preset's default when it is null.
    Returns the format (:class:`lvita.model.formats.ModelFormat`); a directory preset without a readable
    config.json keeps null (validate reports it)."""
    from lvita.model.formats import model_format
    from lvita.model.presets import default_format

    prefix = f"{where}: " if where else ""
    if model.format is None:
        found = default_format(model.preset)
        model.format = None if found is None else found.name
        return found
    try:
        return model_format(model.format)
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}, or leave it null for the preset's own format") from None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str | None, key: str = "train.time_limit") -> float | None:
    """``"47h30m"``, ``"90m"``, ``"3600s"``, ``"1d2h"`` -> seconds; None -> None. Raises ConfigError."""
    if text is None:
        return None
    s = str(text).strip().lower().replace(" ", "")
    parts = _DURATION.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise ConfigError(f"{key}={text!r}: expected a duration such as \"47h30m\", \"90m\", \"3600s\" or \"1d2h\" "
                          f"(units d, h, m, s), or null for no limit")
    seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{key}={text!r}: must be longer than 0")
    return seconds
