"""Tokenizers: load a real one (Qwen2.5) or train the demo's tiny one at run time.

Owns the special tokens the model and the chat template rely on: ChatML (``<|im_start|>``,
``<|im_end|>``, ``<|endoftext|>``) and InternVL's image markers (``<img>``, ``</img>``,
``<IMG_CONTEXT>``). ``load_tokenizer`` adds whichever of them a tokenizer lacks (a plain Qwen2.5
tokenizer lacks the image markers; their new ids still fit its 152064-row embedding).

Under ``model.format: longvita`` (``load_tokenizer(path, LONGVITA)``) it adds instead the 17
tokens released Long-VITA adds (:data:`OFFICIAL_ADDED_TOKENS`, in that order, as
``long_vita/tokenizer.py``'s ``update_tokenizer``): on Qwen2.5's tokenizer they get ids
151665-151681, the ids of the released checkpoints. Tokens a tokenizer already has keep their ids.

    python -c "from lvita.data.tokenizer import train_demo_tokenizer; train_demo_tokenizer('demo_out/tokenizer')"

    from lvita.data.tokenizer import load_tokenizer, special_token_ids
    tok = load_tokenizer("demo_out/tokenizer"); ids = special_token_ids(tok)

Trade-off: the demo tokenizer is a small byte-level BPE (1024 entries by default) trained in well
under a second on English text shipped with the package (``lvita/data/assets/corpus.txt``), so nothing
is downloaded and any text round-trips; it compresses text worse than a real tokenizer, so the
demo's sequences are longer than Qwen2.5 would make them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lvita.model.formats import INTERNVL, LONGVITA, ModelFormat
from lvita.errors import PathError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]
SPECIAL_NAMES = ["endoftext", "im_start", "im_end", "img_start", "img_end", "img_context"]

# Released Long-VITA's added tokens, in its order (long_vita/tokenizer.py update_tokenizer):
# ids 151665-151681 on Qwen2.5's tokenizer. <image> / <video> are the placeholders in its records.
OFFICIAL_ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<vid>", "</vid>", "<VID_CONTEXT>",
                         "<patch>", "</patch>", "<PATCH_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                         "<box>", "</box>", "<image>", "<video>"]
QWEN25_OFFICIAL_IDS = dict(zip(OFFICIAL_ADDED_TOKENS, range(151665, 151682)))
# special_token_ids(tok, LONGVITA) names, beside SPECIAL_NAMES
OFFICIAL_NAMES = {"<vid>": "vid_start", "</vid>": "vid_end", "<VID_CONTEXT>": "vid_context",
                  "<patch>": "patch_start", "</patch>": "patch_end", "<PATCH_CONTEXT>": "patch_context",
                  "<image>": "image_tag", "<video>": "video_tag"}
# Per model format: the tokens a tokenizer must have, in the order missing ones are added, and the
# names special_token_ids gives them (longvita: the official order, so Qwen2.5 gets ids 151665-151681)
FORMAT_TOKENS = {INTERNVL: SPECIAL_TOKENS,
                 LONGVITA: [t for t in SPECIAL_TOKENS if t not in OFFICIAL_ADDED_TOKENS] + OFFICIAL_ADDED_TOKENS}
FORMAT_SPECIAL_NAMES = {INTERNVL: dict(zip(SPECIAL_TOKENS, SPECIAL_NAMES)),
                LONGVITA: {**dict(zip(SPECIAL_TOKENS, SPECIAL_NAMES)), **OFFICIAL_NAMES}}

CORPUS = Path(__file__).parent / "assets" / "corpus.txt"
# Any of these in a directory makes it a candidate for AutoTokenizer.from_pretrained.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def train_demo_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE on the shipped corpus and save it in HF format to ``out_dir``.

    The six :data:`SPECIAL_TOKENS` get ids 0..5 in order. Same files on every run.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} must exceed the 256 byte symbols plus "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    if not CORPUS.is_file():
        raise FileNotFoundError(f"demo tokenizer corpus {CORPUS} is missing; reinstall lvita "
                                f"(it ships as package data lvita/data/assets/corpus.txt)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def _no_tokenizer_error(path: Path, why: str) -> PathError:
    return PathError(
        f"tokenizer path {path}: no tokenizer files there ({why}); point model.tokenizer at a local "
        f"HF tokenizer directory (e.g. a Qwen2.5-14B-Instruct download with tokenizer.json), or make "
        f"the demo one with `lvita demo --data-only` / lvita.data.tokenizer.train_demo_tokenizer(dir)")


def required_tokens(fmt: ModelFormat = INTERNVL) -> list[str]:
    """The tokens a tokenizer must have for model format ``fmt``, in the order they are added."""
    return list(FORMAT_TOKENS[fmt])


def load_tokenizer(path: str | Path, fmt: ModelFormat = INTERNVL) -> Any:
    """A local HF tokenizer with every token of :data:`SPECIAL_TOKENS` present (missing ones added);
    with ``fmt=LONGVITA`` also Long-VITA's 17 :data:`OFFICIAL_ADDED_TOKENS` (missing ones added in
    the official order, so a plain Qwen2.5 tokenizer gets ids 151665-151681).

    Raises PathError when ``path`` is missing or holds no tokenizer files.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise _no_tokenizer_error(path, "the path does not exist")
    if not path.is_dir():
        raise _no_tokenizer_error(path, "it is a file, not a directory")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise _no_tokenizer_error(path, f"none of {', '.join(_TOKENIZER_FILES)}")
    # never the directory's own code: an lvita export in the released layout (and the released checkpoints) carry
    # auto_map for the model, which would make transformers ask "run the custom code? [y/N]" on the terminal
    # (and transformers' "a model of type long_vita to instantiate a model of type ''" warning is about the model's
    # config.json, not the tokenizer: silenced for this call)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
    vocab = tok.get_vocab()
    missing = [t for t in required_tokens(fmt) if t not in vocab]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def special_token_ids(tok: Any, fmt: ModelFormat = INTERNVL) -> dict[str, int]:
    """{"endoftext", "im_start", "im_end", "img_start", "img_end", "img_context"} -> token id; with
    ``fmt=LONGVITA`` also "vid_start", "vid_end", "vid_context", "patch_start", "patch_end",
    "patch_context", "image_tag", "video_tag"."""
    vocab = tok.get_vocab()
    missing = [t for t in required_tokens(fmt) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}; load it with "
                         f"lvita.data.tokenizer.load_tokenizer(path, {fmt.name.upper()})")
    return {name: int(vocab[t]) for t, name in FORMAT_SPECIAL_NAMES[fmt].items()}
