"""Greedy generation on one device with a KV cache: a trained Long-VITA answers a prompt.

Owns inference for the plain :class:`lvita.model.longvita.LongVita`: loading it from an lvita
checkpoint, a directory in the released Long-VITA layout or a Hugging Face InternVL directory
(:func:`load_model`) and greedy decoding
(:func:`lvita.infer.decode.generate`) of prompts built as training builds samples
(:mod:`lvita.infer.prompt`), from the command line::

    python -m lvita.generate --model runs/stage4 --image cat.png --prompt "What is in the picture?"
    python -m lvita.generate --model export/long-vita-hf --messages chat.json --max-new-tokens 64
    python -m lvita.generate --model hf/Long-VITA-128K_HF --prompt "Hi" --json   # {"tokens": [...], "text": ...}
    model, fmt = load_model("runs/stage4")      # fmt: the model's InputFormat (tokenizer, ids, layout)
    p = build_prompt(messages, fmt, images=["cat.png"])
    gen = generate(model, p.input_ids, p.pixel_values, fmt.specials, max_new_tokens=64)  # gen.tokens, gen.stop

The decoding steps are :mod:`lvita.infer.decode`'s; with ``--sp N`` the command decodes
context-parallel (:mod:`lvita.infer.cp_generate`). ``load_model`` builds
a randomly initialised model, then loads the weights: simple, but minutes of CPU for 14B. Bad input
is a clear error (exit 2 from the command line); nothing is ever written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lvita.ckpt.checkpoint import CheckpointError, locate, saved_system_prompt, tokenizer_fingerprint
from lvita.data.media import MediaError
from lvita.data.template import PLACEHOLDER, template_system_prompt
from lvita.infer.decode import Generation, encode_tiles_in_chunks, generate
from lvita.infer.prompt import DEFAULTS, MediaOptions, build_prompt
from lvita.errors import PathError, UserError, run_main

NOT_A_MODEL = ("expected an lvita checkpoint (an output_dir, its checkpoints/ or a global_step<N> with "
               "lvita_manifest.json), a directory in the released Long-VITA layout (config.json with model_type "
               "long_vita + *.safetensors) or a Hugging Face InternVL directory (config.json + *.safetensors)")


def spec_of_hf_config(raw: dict, where: str):
    """The model description (shapes + format) of an HF config.json: the released Long-VITA layout
    (model_type long_vita) or InternVL's (internvl); anything else is a CheckpointError."""
    from lvita.model.formats import format_of_model_type
    from lvita.model.presets import spec_of_config

    if not isinstance(raw, dict) or format_of_model_type(raw.get("model_type")) is None:
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"--model {where}: config.json has model_type {kind!r}; {NOT_A_MODEL}")
    try:
        return spec_of_config(raw, where)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--model {where}: config.json does not describe a model lvita can build ({e})") from None


def load_input_format(model_dir, tokenizer=None):
    """-> (the model's input format, the directory its weights load from), reading only config.json or the
    checkpoint's manifest and the tokenizer: what a prompt needs without the model (``lvita eval --show``).
    Not a model directory: CheckpointError naming the path."""
    from lvita.data.input_format import InputFormat
    from lvita.ckpt.checkpoint import manifest_spec

    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"--model {path}: " + (f"a file, not a directory; {NOT_A_MODEL}" if path.exists()
                                                     else "no such directory"))
    if (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"--model {path}: config.json is unreadable ({e}); {NOT_A_MODEL}") from None
        spec, tok_path = spec_of_hf_config(raw, str(path)), tokenizer or path
    else:
        try:
            found = locate(path, "--model")
        except CheckpointError as e:
            raise CheckpointError(f"--model {path}: not a model directory: {NOT_A_MODEL} ({e})") from None
        path, tok_path = found.tag_dir, tokenizer or found.manifest.get("tokenizer_path")
        spec = manifest_spec(found.manifest, f"--model {path}")
        if not tok_path or not Path(tok_path).is_dir():
            raise CheckpointError(f"--model {path}: its tokenizer ({tok_path}) is not there; pass --tokenizer DIR")
    return InputFormat.load(spec, tok_path), path  # longvita: the 17 official added tokens, released ids


def load_model(model_dir, dtype: torch.dtype | None = None, device="cpu", tokenizer=None):
    """-> (LongVita in eval mode without grads, its input format: tokenizer, special ids, model description).

    ``model_dir``: an lvita checkpoint (output_dir, checkpoints/ or global_step<N>; tokenizer from its
    manifest), a directory in the released Long-VITA layout (``model_type: long_vita``), or an HF
    InternVL directory as :func:`lvita.ckpt.hf.write_hf_dir` writes it (shapes from config.json);
    ``tokenizer`` overrides (:class:`lvita.data.input_format.InputFormat`: ``fmt.tok``, ``fmt.specials``,
    ``fmt.context_ids``, ``fmt.spec``).
    ``dtype`` None: float32 on CPU, else bfloat16. Not a model: CheckpointError (a
    UserError) naming the path and what was expected.
    """
    from lvita.model.longvita import LongVita
    from lvita.ckpt.weights import init_from

    fmt, path = load_input_format(model_dir, tokenizer)
    spec = fmt.spec
    with torch.device(device):
        model = LongVita(spec, fmt.context_ids, seed=0)
    init_from(model, str(path), spec, tokenizer_fingerprint(fmt.tok))
    dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
    return model.to(dtype).eval().requires_grad_(False), fmt


def answer(model, fmt, messages, images=(), videos=(), max_new_tokens: int = 256,
           system_prompt: str | None = DEFAULTS.system_prompt, media: MediaOptions = MediaOptions(),
           max_context: int | None = None, decode=None) -> tuple[str, Generation]:
    """Messages (+ media paths) -> (the decoded answer, stripped; the Generation), in the model's input
    format ``fmt``. ``decode``: :func:`generate` or a function like it (context-parallel: lvita.infer.cp_generate)."""
    p = build_prompt(messages, fmt, images, videos, system_prompt, media, max_context)
    gen = (decode or generate)(model, p.input_ids, p.pixel_values, fmt.specials, max_new_tokens, max_context)
    return fmt.tok.decode(gen.tokens, skip_special_tokens=False).strip(), gen


# -- command line ---------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(ap: argparse.ArgumentParser, model_required: bool = True) -> None:
    """Options shared by ``lvita generate`` and ``lvita eval``; :func:`options` reads them."""
    ap.add_argument("--model", required=model_required,
                    help="lvita output_dir / checkpoints / global_step<N>, or HF dir")
    ap.add_argument("--tokenizer", help="default: the checkpoint's (manifest) or the HF directory's")
    ap.add_argument("--max-new-tokens", type=int, default=256,
                    help="most tokens generated per answer (default 256; lvita eval: the --wrapper's or the set's)")
    ap.add_argument("--max-context", type=int, help="prompt + answer tokens (default: the preset's maximum)")
    ap.add_argument("--system-prompt", help="default: the one the model trained with (the stage's data.system_prompt "
                                            "in a checkpoint's manifest, an HF directory's chat template); '' for none")
    for name, default, what in (("min-tiles", DEFAULTS.min_tiles, "fewest tiles per image"),
                                ("max-tiles", DEFAULTS.max_tiles, "most tiles per image"),
                                ("max-frames", DEFAULTS.max_frames, "most frames sampled per video"),
                                ("video-fps", DEFAULTS.video_fps, "frames per second sampled, at most")):
        ap.add_argument(f"--{name}", type=type(default), default=default,
                        help=f"{what}, as the stage key data.{name.replace('-', '_')} (default {default}; lvita eval on "
                             f"a published benchmark: the --wrapper's)")
    ap.add_argument("--vision-chunk", type=int, default=64, metavar="TILES",
                    help="tiles (images' tiles, video frames) the vision encoder runs at once: bounds its memory at "
                         "thousands of frames (0: all at once)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda when available, else cpu); under the launcher each rank "
                         "uses its local GPU")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    ap.add_argument("--sp", type=int, default=1, help="context-parallel degree (under the deepspeed launcher)")
    ap.add_argument("--ring", type=int, default=1, help="of --sp, the zigzag ring degree (the rest is Ulysses)")
    ap.add_argument("--mode", choices=("cache", "recompute"), default="cache",
                    help="with --sp: sharded KV cache, or the paper's fixed-length recompute per token")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher


def options(args) -> dict:
    """The keyword arguments of :func:`answer` from :func:`add_model_args`' options."""
    if args.max_new_tokens < 1 or (args.max_context is not None and args.max_context < 2):
        raise UserError("--max-new-tokens must be at least 1 and --max-context at least 2")
    return dict(max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt or None,  # None until loaded
                max_context=args.max_context,
                media=MediaOptions(args.min_tiles, args.max_tiles, args.max_frames, args.video_fps))


def model_system_prompt(model_dir, tok) -> str | None:
    """The system prompt a model trained with: an lvita checkpoint's manifest says it; an HF directory's
    chat template adds it (lvita's exports add the stage's, Qwen2.5's adds its own)."""
    from lvita.model.formats import format_of_model_type

    path = Path(model_dir)
    if (path / "config.json").is_file():
        try:
            kind = format_of_model_type(json.loads((path / "config.json").read_text()).get("model_type"))
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind is not None and not kind.default_system_prompt:  # the released model trained with none;
            # VLMEvalKit's wrapper adds none
            return None
        return template_system_prompt(tok, DEFAULTS.system_prompt)
    return saved_system_prompt(locate(path, "--model").manifest)


def load_for_args(args, opts: dict):
    """The model for the command-line options -> (model, input format, decode, rank); with
    ``--sp N > 1`` joins the launcher's process group and decodes context-parallel. Without
    ``--system-prompt``, ``opts["system_prompt"]`` becomes the model's own."""
    rank, device, decode = 0, args.device, None
    if args.sp > 1:
        from lvita.infer import cp_generate

        rank, device = cp_generate.join(args)
    model, fmt = load_model(args.model, DTYPES.get(args.dtype), device, args.tokenizer)
    encode_tiles_in_chunks(model, args.vision_chunk)
    if args.sp > 1:
        decode = cp_generate.generator(args, fmt)
    if args.system_prompt is None:
        opts["system_prompt"] = model_system_prompt(args.model, fmt.tok)
    return model, fmt, decode, rank


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lvita generate", description="Greedy answer from a Long-VITA model.")
    add_model_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user's message; one <image>/<video> per file is prepended if absent")
    src.add_argument("--messages", help="JSON file: a list of {role, content} ending with the user's turn")
    ap.add_argument("--image", action="append", default=[], metavar="PATH",
                    help="an image file; repeat for several, in the order of the prompt's <image> places")
    ap.add_argument("--video", action="append", default=[], metavar="PATH",
                    help="a video file; repeat for several, in the order of the prompt's <video> places")
    ap.add_argument("--json", action="store_true",
                    help='print one JSON line {"tokens": [generated ids], "text": the decoded answer}')
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_main("lvita generate", _main, args)


def _main(args) -> int:
    opts = options(args)
    if args.prompt is not None:
        text = args.prompt if PLACEHOLDER.search(args.prompt) else \
            "<image>\n" * len(args.image) + "<video>\n" * len(args.video) + args.prompt
        messages = [{"role": "user", "content": text}]
    else:
        try:
            messages = json.loads(Path(args.messages).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PathError(f"--messages {args.messages}: cannot read it as JSON ({e})") from None
    for kind, paths in (("image", args.image), ("video", args.video)):  # before a long model load
        if missing := [p for p in paths if not Path(p).is_file()]:
            raise MediaError(f"missing {kind} {missing[0]}")
    model, fmt, decode, rank = load_for_args(args, opts)
    text, gen = answer(model, fmt, messages, args.image, args.video, decode=decode, **opts)
    if rank == 0:
        print(json.dumps({"tokens": [int(t) for t in gen.tokens], "text": text}) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
