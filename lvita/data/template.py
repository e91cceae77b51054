"""Qwen2.5 ChatML template: conversation -> token ids + next-token targets on assistant turns.

Owns the text side of a sample (record schemas are :mod:`lvita.data.formats`'s). ``<image>`` /
``<video>`` placeholders expand to ``<img>`` + tokens x ``<IMG_CONTEXT>`` + ``</img>`` per tile
group. Only assistant content and its ``<|im_end|>`` are learned; the returned ``targets[t]`` is
the token that position t must predict (already shifted), -100 elsewhere, so shards of a sequence
need no neighbour to compute their loss.

    ids, targets = encode_conversation(msgs, tok, specials, "You are ...", [16, 16])
"""
from __future__ import annotations

import re

IGNORE = -100
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
PLACEHOLDER = re.compile(r"(<image>|<video>)")


class SampleError(ValueError):
    """The sample is malformed; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def normalise_messages(sample: dict) -> list[dict]:
    """-> [{"role": "system"|"user"|"assistant", "content": str}, ...] for any record schema of
    :mod:`lvita.data.formats` (detected per record)."""
    from lvita.data.formats import normalise

    return normalise(sample).messages


def count_placeholders(messages: list[dict]) -> tuple[int, int]:
    text = "".join(m["content"] for m in messages)
    return text.count("<image>"), text.count("<video>")


def encode_conversation(messages: list[dict], tok, specials: dict, system_prompt: str | None,
                        media_tokens: list[list[int]]) -> tuple[list[int], list[int]]:
    """media_tokens[i] lists the image-token count of each tile group of placeholder i
    (one entry for an image, one per frame for a video)."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    # Every text piece is tokenised separately (as before) but in one batched call: a record's
    # roles, newline and text pieces cost one trip into the tokenizer instead of one each.
    pieces = [(m, PLACEHOLDER.split(m["content"])) for m in messages]
    texts = sorted({"\n", *(m["role"] for m in messages), *(p for _, ps in pieces for p in ps
                                                            if p and p not in ("<image>", "<video>"))})
    encoded = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"]))
    enc = encoded.__getitem__
    newline = enc("\n")
    ids: list[int] = []
    learn: list[bool] = []
    media = iter(media_tokens)

    def add(tokens: list[int], learned: bool) -> None:
        ids.extend(tokens)
        learn.extend([learned] * len(tokens))

    for m, split in pieces:
        add([specials["im_start"]] + enc(m["role"]) + newline, False)
        learned = m["role"] == "assistant"
        for piece in split:
            if piece in ("<image>", "<video>"):
                for n in next(media):
                    add([specials["img_start"]] + [specials["img_context"]] * n + [specials["img_end"]], False)
            elif piece:
                add(enc(piece), learned)
        add([specials["im_end"]], learned)
        add(newline, False)
    targets = [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, targets
