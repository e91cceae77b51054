"""Qwen2.5 ChatML template: conversation -> token ids + next-token targets on assistant turns.

This is the ``model.format: internvl`` layout; released Long-VITA's (``longvita``) is
:mod:`lvita.data.longvita`, which returns ids and targets of the same form.

Owns the text side of a sample (record schemas are :mod:`lvita.data.formats`'s). ``<image>`` /
``<video>`` placeholders expand to ``<img>`` + tokens x ``<IMG_CONTEXT>`` + ``</img>`` per tile
group. Only assistant content and its ``<|im_end|>`` are learned; the returned ``targets[t]`` is
the token that position t must predict (already shifted), -100 elsewhere, so shards of a sequence
need no neighbour to compute their loss.

    ids, targets = encode_conversation(msgs, tok, specials, "You are ...", [16, 16])

Also the same turns as a Jinja chat template for Hugging Face exports (:func:`jinja_chat_template`,
default system prompt included, as Qwen2.5's own template does) and the reverse question, which
system prompt a tokenizer's template adds (:func:`template_system_prompt`).
"""
from __future__ import annotations

import json
import re

from lvita.errors import UserError

IGNORE = -100
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
PLACEHOLDER = re.compile(r"(<image>|<video>)")


class SampleError(UserError, ValueError):
    """The sample is malformed; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with lone surrogates (JSON ``"\\ud83d"``: an emoji cut in half upstream) replaced by
    U+FFFD: they are not UTF-8, and the tokenizer raises a TypeError on them instead of encoding."""
    return _SURROGATE.sub("\ufffd", text)


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
    # <IMG_CONTEXT> written as text would be a feature slot without a tile (the model's count of
    # context tokens and tiles would disagree mid-training): skipped, as lvita.data.longvita does
    if any(specials["img_context"] in encoded[t] for t in texts):
        raise SampleError("placeholder_mismatch", "the text holds the image context token <IMG_CONTEXT> as text")
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
                group = next(media, None)
                if group is None:  # more placeholders than media: a skip, not a StopIteration
                    raise SampleError("placeholder_mismatch", "more <image>/<video> placeholders than media")
                for n in group:
                    add([specials["img_start"]] + [specials["img_context"]] * n + [specials["img_end"]], False)
            elif piece:
                add(enc(piece), learned)
        add([specials["im_end"]], learned)
        add(newline, False)
    targets = [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, targets


def jinja_chat_template(system_prompt: str | None) -> str:
    """The ChatML turns of :func:`encode_conversation` as a transformers chat template: ``system_prompt``
    opens every conversation that has no system turn; an image becomes ``<IMG_CONTEXT>``, a video
    ``<video>`` (InternVL's processor expands them into tiles)."""
    # A JSON string is a valid Jinja string literal (quotes, backslashes, newlines escaped).
    default = (f"{{%- if messages[0]['role'] != 'system' %}}{{{{ '<|im_start|>system\\n' + "
               f"{json.dumps(system_prompt, ensure_ascii=False)} + '<|im_end|>\\n' }}}}{{%- endif %}}"
               if system_prompt else "")
    return default + (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
        "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
        "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")


_SYSTEM_TURN = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", re.S)


def template_system_prompt(tok, default: str | None) -> str | None:
    """The system prompt ``tok``'s chat template adds to a conversation without one (None when it
    adds none, ``default`` when the tokenizer has no chat template or it is not ChatML)."""
    if not getattr(tok, "chat_template", None):
        return default
    probe = "\x00probe\x00"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain turn says nothing
        return default
    if not isinstance(text, str) or probe not in text:
        return default
    head = text[:text.index(probe)]
    if head.endswith("<|im_start|>user\n"):
        found = _SYSTEM_TURN.match(head)
        return found.group(1) if found else None
    return default
