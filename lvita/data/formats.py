"""Record schemas: one published record (any of the layouts below) -> one conversation + its media.

Owns the translation from the shapes datasets are published in to lvita's single internal form,
``Sample(messages=[{"role", "content"}], images=[...], videos=[...])``. The schema is detected per
record (``format: "auto"``), or forced per source with ``data.sources[i].format``:

========== ======================================================== =============================
format     record                                                   published as
========== ======================================================== =============================
messages   ``messages`` [{role: system|user|assistant, content}]    Long-VITA JSONs, LongAlign-10k,
           (content may also be a list of {type: text|image|video})  LongWriter-6k
sharegpt   ``conversations`` [{from: human|gpt|system, value}]      LLaVA-665K, ShareGPT4V, ALLaVA,
           (user/assistant accepted too)                            LLaVA-OneVision, OpenHermes-2.5
cauldron   ``texts`` [{user, assistant, source}]: one turn each     the_cauldron, Docmatix,
           (or Firefly's ``conversation`` [{human, assistant}])      LongQLoRA
instruction one prompt field (instruction|query|question|prompt),   dolly-15k, Alpaca, MetaMathQA,
           optional input|context, one answer field                 MathInstruct, Orca-Math,
           (output|response|answer|completion), optional system;    LongAlpaca, goat, LongForm
           ``input`` alone is the prompt when there is no other
lima       ``conversations`` as a list of strings, user first       LIMA
========== ======================================================== =============================

Instruction records: the context or input follows the instruction in the user turn after a blank
line (Alpaca's and dolly's cards: the input/context is the material the instruction refers to);
``system`` / ``system_prompt`` becomes a ChatML system turn. Media keys: ``images`` or ``image``,
``videos`` or ``video``; each a string, a ``{"bytes", "path"}`` dict (the ``datasets`` Image
feature) or a list of them. They are returned as given; :mod:`lvita.data.plan` resolves them.

Placeholders (``resolve_placeholders``): a record with media and no ``<image>``/``<video>`` in its
text gets one placeholder per image, then per video, at the start of the first user turn (LLaVA /
InternVL convention, and what the_cauldron needs); a record with only videos whose text uses
``<image>`` once per video (LLaVA-Video-178K's convention) has them read as ``<video>``; any other
disagreement is ``placeholder_mismatch``.

    sample = normalise(raw_dict, "auto")     # raises SampleError(reason, detail)
    resolve_placeholders(sample)

Trade-off: detection looks only at key names, so a record carrying two schemas is read by the
first in the table; force ``format`` for such a source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lvita.config.schema import RECORD_SCHEMAS, ConfigError
from lvita.data.template import ROLE_ALIASES, SampleError, count_placeholders, valid_text

PROMPT_KEYS = ("instruction", "query", "question", "prompt")
INPUT_KEYS = ("input", "context")
ANSWER_KEYS = ("output", "response", "answer", "completion")
SYSTEM_KEYS = ("system", "system_prompt")


@dataclass
class Sample:
    messages: list[dict]
    images: list = field(default_factory=list)  # str path | {"bytes", "path"} dict, as in the record
    videos: list = field(default_factory=list)


def check_schema(schema: str, where: str) -> None:
    """A record schema name (``data.sources[].format``) must be one of RECORD_SCHEMAS."""
    if schema not in RECORD_SCHEMAS:
        raise ConfigError(f"{where}='{schema}': unknown record format; use one of {', '.join(RECORD_SCHEMAS)}")


def detect(raw: dict) -> str:
    if "messages" in raw:
        return "messages"
    conv = raw.get("conversations")
    if isinstance(conv, list) and conv and all(isinstance(c, str) for c in conv):
        return "lima"
    if "conversations" in raw:
        return "sharegpt"
    if "texts" in raw or isinstance(raw.get("conversation"), list):
        return "cauldron"
    if any(k in raw for k in PROMPT_KEYS + INPUT_KEYS) and any(k in raw for k in ANSWER_KEYS):
        return "instruction"
    raise SampleError("empty_conversation", f"no conversation: expected 'messages', 'conversations', 'texts' "
                                            f"or instruction/answer fields; the record has {sorted(raw)[:8]}")


def _turns(raw: list, rk: str, ck: str) -> list[dict]:
    out = []
    for i, m in enumerate(raw):
        # a role that is a list or dict (unhashable) is as malformed as an unknown one, not a TypeError
        if not isinstance(m, dict) or not isinstance(m.get(rk), str) or m[rk] not in ROLE_ALIASES:
            raise SampleError("malformed_message", f"message {i} needs '{rk}' in {sorted(ROLE_ALIASES)} "
                                                   f"and a string '{ck}'")
        content = m.get(ck)
        if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image"}, ...]
            content = _join_parts(content, i)
        if not isinstance(content, str):
            raise SampleError("malformed_message", f"message {i} needs '{rk}' in {sorted(ROLE_ALIASES)} "
                                                   f"and a string '{ck}'")
        out.append({"role": ROLE_ALIASES[m[rk]], "content": content})
    return out


def _join_parts(parts: list, i: int) -> str:
    text = []
    for p in parts:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            text.append(p["text"])
        elif kind in ("image", "video"):
            text.append(f"<{kind}>")
        else:
            raise SampleError("malformed_message", f"message {i}: content parts must be "
                                                   f"{{type: text, text}} or {{type: image|video}}")
    return "".join(text)


def _messages(raw: dict) -> list[dict]:
    return _turns(_list(raw, "messages"), "role", "content")


def _sharegpt(raw: dict) -> list[dict]:
    conv = _list(raw, "conversations")
    return _turns(conv, "from" if isinstance(conv[0], dict) and "from" in conv[0] else "role",
                  "value" if isinstance(conv[0], dict) and "value" in conv[0] else "content")


def _cauldron(raw: dict) -> list[dict]:
    key = "texts" if "texts" in raw or "conversation" not in raw else "conversation"
    out = []
    for i, t in enumerate(_list(raw, key)):
        user = t.get("user", t.get("human")) if isinstance(t, dict) else None
        if not isinstance(user, str) or not isinstance(t.get("assistant"), str):
            raise SampleError("malformed_message", f"{key}[{i}] needs string 'user' (or 'human') and 'assistant'")
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": t["assistant"]}]
    return out


def _lima(raw: dict) -> list[dict]:
    conv = _list(raw, "conversations")
    if not all(isinstance(c, str) for c in conv):
        raise SampleError("malformed_message", "LIMA-style 'conversations' must be a list of strings")
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(conv)]


def _first(raw: dict, keys: tuple) -> str | None:
    for k in keys:
        if isinstance(raw.get(k), str):
            return raw[k]
    return None


def _instruction(raw: dict) -> list[dict]:
    prompt, answer, extra = _first(raw, PROMPT_KEYS), _first(raw, ANSWER_KEYS), _first(raw, INPUT_KEYS)
    if prompt is None:  # LongForm: the input alone is the prompt
        prompt, extra = extra, None
    if prompt is None or answer is None:
        raise SampleError("empty_conversation", f"an instruction record needs a string prompt ({'|'.join(PROMPT_KEYS)} "
                                                f"or {'|'.join(INPUT_KEYS)}) and answer ({'|'.join(ANSWER_KEYS)})")
    user = prompt + (f"\n\n{extra}" if extra and extra.strip() else "")
    system = _first(raw, SYSTEM_KEYS)
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _list(raw: dict, key: str) -> list:
    value = raw.get(key)
    if value is None:
        raise SampleError("empty_conversation", f"no '{key}' key")
    if not isinstance(value, list) or not value:
        raise SampleError("empty_conversation", f"'{key}' is empty")
    return value


READERS = {"messages": _messages, "sharegpt": _sharegpt, "cauldron": _cauldron, "instruction": _instruction,
           "lima": _lima}


def _media(raw: dict, plural: str, singular: str) -> list:
    value = raw.get(plural, raw.get(singular))
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def normalise(raw, schema: str = "auto") -> Sample:
    """A parsed record -> Sample in its record ``schema`` (RECORD_SCHEMAS; "auto": detected); raises
    SampleError with a reason for anything unusable."""
    if not isinstance(raw, dict):
        raise SampleError("malformed_json", "a record must be a JSON object")
    messages = READERS[detect(raw) if schema == "auto" else schema](raw)
    messages = [{**m, "content": valid_text(m["content"])} for m in messages]  # lone surrogates: not a crash
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SampleError("no_assistant_turn", "no assistant turn to learn from")
    return Sample(messages, _media(raw, "images", "image"), _media(raw, "videos", "video"))


def resolve_placeholders(sample: Sample) -> Sample:
    """Insert missing placeholders (see the module docstring) or raise ``placeholder_mismatch``."""
    n_img, n_vid = count_placeholders(sample.messages)
    images, videos = len(sample.images), len(sample.videos)
    if (images or videos) and n_img == n_vid == 0:
        first = next((i for i, m in enumerate(sample.messages) if m["role"] == "user"), None)
        if first is None:
            raise SampleError("placeholder_mismatch", "media but no user turn to put their placeholders in")
        m = sample.messages[first]
        sample.messages[first] = {**m, "content": "<image>\n" * images + "<video>\n" * videos + m["content"]}
    elif videos and not images and n_vid == 0 and n_img == videos:  # LLaVA-Video: <image> marks the video
        sample.messages = [{**m, "content": m["content"].replace("<image>", "<video>")} for m in sample.messages]
    else:
        if (n_img, n_vid) != (images, videos):
            raise SampleError("placeholder_mismatch", f"{n_img} <image> / {n_vid} <video> placeholders for "
                                                      f"{images} images / {videos} videos")
    return sample


def normalise_messages(sample: dict) -> list[dict]:
    """-> [{"role": "system"|"user"|"assistant", "content": str}, ...] for any record schema above
    (detected per record)."""
    return normalise(sample).messages
