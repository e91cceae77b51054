"""``lvita convert``: checkpoints to and from Hugging Face, and ``lvita ckpt to-universal``.

    lvita convert to-hf runs/stage4 export/long-vita-hf        # newest checkpoint of a run, any layout
    lvita convert to-hf runs/stage4 export/long-vita --format longvita
    lvita convert to-hf runs/lora export/lora-adapter --adapter-only   # PEFT adapter files (a LoRA run)
    lvita convert to-hf runs/lora export/lora-base --base-only         # the base they apply to
    lvita convert from-hf hf/Long-VITA-16K_HF lvita_init                # shapes from its config.json
    lvita convert from-hf hf/InternViT-300M-448px hf/Qwen2.5-14B-Instruct lvita_init --preset longvita-14b
    lvita ckpt to-universal runs/stage2/checkpoints/global_step500

``to-hf`` writes, from the per-block weight files of a checkpoint with the run's tokenizer, either
the released Long-VITA layout (``--format longvita``, :mod:`lvita.ckpt.released`) or a
transformers-native ``InternVLForConditionalGeneration`` directory (``--format internvl``,
:mod:`lvita.ckpt.hf`); the default is the checkpoint's own ``model.format``, the only one its
projector fits. A LoRA checkpoint exports merged, or as PEFT adapter files plus their base
(``--adapter-only`` / ``--base-only``, :mod:`lvita.ckpt.adapter_export`). ``from-hf`` takes the shapes
from the source's config.json unless ``--preset``.
``from-hf`` writes a weights-only lvita checkpoint (``OUT/checkpoints/global_step0``, the per-block
files plus a manifest) and the tokenizer in ``OUT/tokenizer``; point ``model.init_from`` at OUT and
``model.tokenizer`` at ``OUT/tokenizer`` (``model.init_from`` also reads HF directories directly;
converting once saves every rank re-reading the HF shards). Outputs are written to a temporary
sibling and renamed, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lvita.model.formats import LONGVITA, ModelFormat, model_format
from lvita.ckpt.checkpoint import (FORMAT, MANIFEST, CheckpointError, atomic_write, locate, manifest_spec,
                                   saved_system_prompt, staged_dir, tag_for, tokenizer_fingerprint)
from lvita.errors import PathError, run_main


def _tokenizer_for(found, tokenizer: str | None, fmt: ModelFormat):
    """The run's tokenizer as training loaded it (``fmt``: the model format, whose tokens it adds)."""
    from lvita.data.tokenizer import load_tokenizer

    path = tokenizer or found.manifest.get("tokenizer_path")
    if not path or not Path(path).is_dir():
        raise CheckpointError(f"{found.tag_dir}: its tokenizer ({path}) is not there; pass --tokenizer DIR")
    tok = load_tokenizer(path, fmt)
    if found.manifest.get("tokenizer") and tokenizer_fingerprint(tok) != found.manifest["tokenizer"]:
        raise CheckpointError(f"--tokenizer {path}: vocabulary differs from the one {found.tag_dir} was trained "
                              f"with ({found.manifest['tokenizer']}); pass the run's own tokenizer")
    return path, tok


def to_hf(ckpt: str, out: str, tokenizer: str | None = None, log=print, fmt: "str | ModelFormat | None" = None,
          adapter_only: bool = False, base_only: bool = False) -> Path:
    """Export a checkpoint in an export layout, named by its model format (``--format``): LONGVITA the
    released Long-VITA layout, INTERNVL transformers' InternVLForConditionalGeneration; None: the
    checkpoint's own format (the only one its projector fits). A LoRA checkpoint exports merged
    (W + alpha/rank B@A); ``adapter_only``: its adapters as PEFT files, ``base_only``: the model they apply
    to, adapters left out (:mod:`lvita.ckpt.adapter_export`)."""
    from lvita.ckpt import hf
    from lvita.ckpt.adapter_export import run_lora, write_adapter_dir
    from lvita.ckpt.released import write_released_dir
    from lvita.data.tokenizer import special_token_ids
    from lvita.ckpt.weights import checkpoint_plain_state
    from lvita.model.lora import base_state

    found = locate(ckpt, "checkpoint")
    spec = manifest_spec(found.manifest, found.tag_dir)
    try:
        layout = model_format(fmt or spec.format)
    except ValueError as e:
        raise CheckpointError(f"--format: {e}") from None
    if layout is not spec.format:
        raise CheckpointError(f"--format {layout}: {found.tag_dir} holds a model.format='{spec.format}' model, whose "
                              f"projector has no place in the {layout} layout; use --format {spec.format}")
    if adapter_only and base_only:
        raise CheckpointError("--adapter-only and --base-only: choose one (run the export twice for both)")
    if adapter_only:
        return write_adapter_dir(found, spec, out, log)
    tok_path, tok = _tokenizer_for(found, tokenizer, spec.format)
    t0 = time.perf_counter()
    n_layers = spec.llm["num_hidden_layers"]
    if base_only:
        run_lora(found, "--base-only")
        plain = base_state(checkpoint_plain_state(found.tag_dir, n_layers, merge=False))
    else:
        plain = checkpoint_plain_state(found.tag_dir, n_layers)
    what = (" (LoRA adapters left out: the base of --adapter-only)" if base_only
            else " (LoRA adapters merged)" if found.manifest.get("lora") else "")
    if layout is LONGVITA:
        path = write_released_dir(plain, spec, tok_path, out)
        log(f"lvita convert: wrote {path} in the released Long-VITA layout from {found.tag_dir} ({spec.name}){what} "
            f"in {time.perf_counter() - t0:.1f}s; load it with AutoModelForCausalLM.from_pretrained(DIR, "
            f"trust_remote_code=True) (its modelling code is in the directory), as the official tools do, or "
            f"lvita generate --model")
        return path
    system = saved_system_prompt(found.manifest)
    path = hf.write_hf_dir(plain, spec, tok_path, out, special_token_ids(tok, spec.format)["img_context"],
                           system_prompt=system)
    log(f"lvita convert: wrote {path} from {found.tag_dir} ({spec.name}){what} in {time.perf_counter() - t0:.1f}s; its chat "
        f"template adds the system prompt {system!r} when a conversation has none, as training did")
    return path


def from_hf(sources: list[str], out: str, preset=None, tokenizer: str | None = None, log=print,
            fmt: str | None = None) -> Path:
    """Write a weights-only lvita checkpoint; the projector starts fresh (seed 0) when the sources
    are a separate InternViT and Qwen2. ``preset`` None: the shapes (and format) of the one source
    directory's config.json (the released layout or InternVL's); ``fmt``: model.format (None: the
    preset's own)."""
    from lvita.ckpt import hf_read
    from lvita.config.schema import DataConfig
    from lvita.data.template import template_system_prompt
    from lvita.model.longvita import LongVita
    from lvita.data.input_format import InputFormat
    from lvita.model.presets import llm_config, spec_of
    from lvita.data.tokenizer import load_tokenizer
    from lvita.ckpt.checkpoint import model_info
    from lvita.ckpt.weights import layer_file
    from lvita.model.longvita import by_block

    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PathError(f"lvita convert from-hf: {out_dir} exists and is not empty; choose a new directory")
    tok_src = tokenizer or next((s for s in sources if (Path(s) / "tokenizer_config.json").is_file()), None)
    if tok_src is None:
        raise CheckpointError(f"none of {', '.join(sources)} has a tokenizer; pass --tokenizer DIR")
    if preset is None and len(sources) != 1:
        raise CheckpointError("from-hf with an InternViT and a Qwen2 directory needs --preset (the model's shapes)")
    try:
        spec = spec_of(preset if preset is not None else sources[0], fmt)
    except ValueError as e:
        raise CheckpointError(f"lvita convert from-hf: {e}") from None
    t0 = time.perf_counter()
    state, fresh = hf_read.read_hf(sources, spec)
    tok = load_tokenizer(tok_src, spec.format)  # longvita: the 17 official tokens added, as training adds them
    released = Path(sources[0], "config.json").is_file() and json.loads(
        Path(sources[0], "config.json").read_text()).get("model_type") == LONGVITA.hf_model_type
    # the model's own default: the released model trained and is evaluated with none
    system = None if released else template_system_prompt(tok, DataConfig.system_prompt)
    if fresh:
        init = LongVita(spec, InputFormat.of(spec, tok).context_ids, seed=0).state_dict()
        state.update({k: init[k] for k in fresh})
        log(f"lvita convert: {len(fresh)} projector weights start fresh (none in {', '.join(sources)})")
    n_layers = llm_config(spec).num_hidden_layers
    blocks = by_block({k: v.contiguous() for k, v in state.items()}, n_layers)
    with staged_dir(out_dir) as tmp:
        tag_dir = tmp / "checkpoints" / tag_for(0)
        tag_dir.mkdir(parents=True)
        for b, sd in sorted(blocks.items()):
            torch.save(sd, layer_file(tag_dir, b))
        tok.save_pretrained(str(tmp / "tokenizer"))
        manifest = {"format": FORMAT, "tag": tag_for(0), "step": 0, "name": "from-hf", **model_info(spec),
                    "precision": str(next(iter(state.values())).dtype).replace("torch.", ""),
                    "tokenizer": tokenizer_fingerprint(tok), "tokenizer_path": str(out_dir.resolve() / "tokenizer"),
                    "system_prompt": system,
                    "layout": None, "weights_only": True, "source": [str(s) for s in sources],
                    "files": {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir())}}
        atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write(tmp / "checkpoints" / "latest", tag_for(0))
    log(f"lvita convert: wrote {out_dir} ({spec.name}, model.format {spec.format}, {len(blocks)} blocks) in {time.perf_counter() - t0:.1f}s; "
        f"use model.init_from={out_dir} model.tokenizer={out_dir / 'tokenizer'}")
    return out_dir


def main(args) -> int:
    """``lvita ckpt`` / ``lvita convert`` with the CLI's parsed ``args``; bad input: one line, exit 2."""
    return run_main(f"lvita {args.cmd}", _main, args)


def _main(args) -> int:
    from lvita.ckpt.resume import to_universal

    if args.cmd == "ckpt":
        to_universal(args.dir)
    elif args.convert_cmd == "to-hf":
        to_hf(args.ckpt, args.out, args.tokenizer, fmt=args.format, adapter_only=args.adapter_only,
              base_only=args.base_only)
    else:
        *sources, out = args.paths
        if not 1 <= len(sources) <= 2:
            raise CheckpointError("from-hf takes SRC [SRC2] OUT: one directory in the released Long-VITA layout "
                                  "or InternVL's, or an InternViT and a Qwen2 directory, then the output directory")
        from_hf(sources, out, args.preset, args.tokenizer, fmt=args.format)
    return 0
