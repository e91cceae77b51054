"""Tokenizers: load a real one (Qwen2.5) or train the demo's small one at run time.

Owns the special tokens the model and the template rely on: ChatML (``<|im_start|>``,
``<|im_end|>``, ``<|endoftext|>``) and InternVL's image markers (``<img>``, ``</img>``,
``<IMG_CONTEXT>``). ``load_tokenizer`` adds the image markers when a tokenizer lacks them (a plain
Qwen2.5 tokenizer does; their ids still fit its 152064-row embedding).

    python -c "from lvita.tokenizer import train_demo_tokenizer; train_demo_tokenizer('demo_out/tokenizer')"

Trade-off: the demo tokenizer is a 2048-entry byte-level BPE trained in about a second on text
shipped in the package (``lvita/assets/corpus.txt``), so nothing is downloaded; it round-trips
any text but compresses worse than a real one.
"""
from __future__ import annotations

from pathlib import Path

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]
CORPUS = Path(__file__).parent / "assets" / "corpus.txt"


def train_demo_tokenizer(out_dir: str | Path, vocab_size: int = 2048) -> Path:
    """Train a byte-level BPE on the shipped corpus and save it in HF format to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path):
    """A local HF tokenizer with every special token of :data:`SPECIAL_TOKENS` present."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not any(path.glob("tokenizer*")):
        raise FileNotFoundError(f"model.tokenizer={path}: no tokenizer files there; point it at a local "
                                f"HF tokenizer directory (e.g. Qwen2.5-14B-Instruct) or run `lvita demo`")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def special_token_ids(tok) -> dict[str, int]:
    names = ["endoftext", "im_start", "im_end", "img_start", "img_end", "img_context"]
    return {n: tok.convert_tokens_to_ids(t) for n, t in zip(names, SPECIAL_TOKENS)}
