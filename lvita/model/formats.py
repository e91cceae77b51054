"""The model formats: what ``model.format`` names, as objects built once and passed down.

Owns the definition of the two formats lvita trains and exports, and their model-side facts:

- ``LONGVITA``: Long-VITA as released (``VITA-MLLM/Long-VITA``): the ResamplerProjector (no biases,
  vision-width middle layer), context runs ``<img>``/``<patch>``/``<vid>`` with three context tokens,
  HF directories with ``model_type`` ``long_vita``, no default system prompt.
- ``INTERNVL``: InternVL's projector and input layout (the transformers-native
  ``InternVLForConditionalGeneration``): one context token, ``model_type`` ``internvl``.

Everything that differs between the two in the data a model sees (tokens, conversation encoding,
tile budget, frame sampling) is :mod:`lvita.data.input_format`'s, keyed by these objects. Code
compares formats by identity (``spec.format is LONGVITA``) or reads their fields; the names below
are parsed only here (:func:`model_format`), from stage files, manifests and the command line.

    from lvita.model.formats import LONGVITA, model_format
    fmt = model_format("longvita")          # -> LONGVITA; an unknown name is a ValueError
    fmt.context_tokens                      # ('<IMG_CONTEXT>', '<PATCH_CONTEXT>', '<VID_CONTEXT>')
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFormat:
    """One model format. Not a string: ``LONGVITA == "longvita"`` is False; ``str(LONGVITA)`` is its name."""
    name: str  # model.format in stage files, manifests and --format
    hf_model_type: str  # config.json model_type of its Hugging Face directories
    context_tokens: tuple[str, ...]  # the tokens whose positions take vision features (the first: images)
    vision_width_projector: bool  # the projector's middle layer is the vision width (else the LLM's)
    default_system_prompt: bool  # trains with data.system_prompt's default when a stage leaves it unset
    about: str  # one line for error messages and --help

    def __str__(self) -> str:
        return self.name


LONGVITA = ModelFormat("longvita", "long_vita", ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>"),
                       vision_width_projector=True, default_system_prompt=False,
                       about="the released Long-VITA architecture and input layout")
INTERNVL = ModelFormat("internvl", "internvl", ("<IMG_CONTEXT>",), vision_width_projector=False,
                       default_system_prompt=True, about="InternVL's projector and input layout")
MODEL_FORMATS = (LONGVITA, INTERNVL)
FORMAT_NAMES = tuple(f.name for f in MODEL_FORMATS)  # choices of --format and model.format


def model_format(value: "str | ModelFormat") -> ModelFormat:
    """A format from its name (stage files, manifests, the command line) or itself; ValueError otherwise."""
    if isinstance(value, ModelFormat):
        return value
    for f in MODEL_FORMATS:
        if value == f.name:
            return f
    raise ValueError(f"model.format={value!r}: choose " + " or ".join(f'"{f.name}" ({f.about})' for f in MODEL_FORMATS))


def format_of_model_type(model_type) -> ModelFormat | None:
    """The format of a Hugging Face directory whose config.json has this ``model_type`` (None: neither)."""
    return next((f for f in MODEL_FORMATS if f.hf_model_type == model_type), None)
