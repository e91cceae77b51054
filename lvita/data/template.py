"""Qwen2.5 ChatML template: conversation -> token ids + next-token targets on assistant turns.

Owns the text side of a sample. Accepts ``messages`` (role/content) and LLaVA-style
``conversations`` (from/value). ``<image>`` / ``<video>`` placeholders expand to
``<img>`` + tokens x ``<IMG_CONTEXT>`` + ``</img>`` per tile group. Only assistant content and
its ``<|im_end|>`` are learned; the returned ``targets[t]`` is the token that position t must
predict (already shifted), -100 elsewhere, so shards of a sequence need no neighbour to compute
their loss.

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
    """-> [{"role": "system"|"user"|"assistant", "content": str}, ...]."""
    if "messages" in sample:
        raw, rk, ck = sample["messages"], "role", "content"
    elif "conversations" in sample:
        raw, rk, ck = sample["conversations"], "from", "value"
    else:
        raise SampleError("empty_conversation", "no 'messages' or 'conversations' key")
    if not isinstance(raw, list) or not raw:
        raise SampleError("empty_conversation", "the conversation is empty")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get(rk) not in ROLE_ALIASES or not isinstance(m.get(ck), str):
            raise SampleError("malformed_message", f"message {i} needs '{rk}' in {sorted(ROLE_ALIASES)} "
                                                   f"and a string '{ck}'")
        out.append({"role": ROLE_ALIASES[m[rk]], "content": m[ck]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise SampleError("no_assistant_turn", "no assistant turn to learn from")
    return out


def count_placeholders(messages: list[dict]) -> tuple[int, int]:
    text = "".join(m["content"] for m in messages)
    return text.count("<image>"), text.count("<video>")


def encode_conversation(messages: list[dict], tok, specials: dict, system_prompt: str | None,
                        media_tokens: list[list[int]]) -> tuple[list[int], list[int]]:
    """media_tokens[i] lists the image-token count of each tile group of placeholder i
    (one entry for an image, one per frame for a video)."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    newline = enc("\n")
    ids: list[int] = []
    learn: list[bool] = []
    media = iter(media_tokens)

    def add(tokens: list[int], learned: bool) -> None:
        ids.extend(tokens)
        learn.extend([learned] * len(tokens))

    for m in messages:
        add([specials["im_start"]] + enc(m["role"]) + newline, False)
        learned = m["role"] == "assistant"
        for piece in PLACEHOLDER.split(m["content"]):
            if piece in ("<image>", "<video>"):
                for n in next(media):
                    add([specials["img_start"]] + [specials["img_context"]] * n + [specials["img_end"]], False)
            elif piece:
                add(enc(piece), learned)
        add([specials["im_end"]], learned)
        add(newline, False)
    targets = [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, targets
