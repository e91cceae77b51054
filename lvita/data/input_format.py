"""The input format: everything that differs between model formats in what the model sees.

Owns, for one model format bound to one tokenizer, built once per run (:meth:`InputFormat.load`)
and passed down to training's planner, ``lvita data show/check/preview``, ``build_prompt``, V-NIAH
and the benchmark prompts:

- the tokens: the special ids (``specials``) and the context ids whose positions take features;
- the conversation encoding with image and video runs (:meth:`encode`, :meth:`prompt_ids`);
- the tile budget: the first budget per image and its halving, and :meth:`fit`, the one place that
  chooses how many tiles a sample's images get so that it fits a token limit;
- the pixels: tile order (:meth:`medium_tiles`), frame sampling and frame padding (``frames``).

:class:`InternVLInput`: one ``<img>`` run per image (grid then thumbnail), frames resized,
``data.max_tiles`` shared out between a sample's images. :class:`LongVitaInput`: released
Long-VITA's layout (:mod:`lvita.data.longvita`): thumbnail first, ``<patch>`` runs per row, ``<vid>``
runs per frame, every image up to ``data.max_tiles``, the official frame rules.

    fmt = InputFormat.load(spec, "path/to/tokenizer")      # spec: lvita.model.presets.ModelSpec
    fitted = fmt.fit(messages, None, [ImageHeader("a.png", 640, 480)], min_tiles=1, max_tiles=12, limit=4096)
    fitted.ids, fitted.targets, fitted.media               # media: [PlannedImage(...)]
    tiles = fmt.medium_tiles(fitted.media[0], "a.png", min_tiles=1)   # (n, 3, T, T) uint8

Trade-off: the fit encodes the text once at the first budget and counts image tokens arithmetically
for the smaller ones (only image tokens change between budgets), then encodes once more at the
chosen budget; a sample that fits at once is encoded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lvita.data import longvita
from lvita.data.media import (INTERNVL_FRAMES, LONGVITA_FRAMES, FrameRule, image_tiles, tile_grid,
                              video_frame_count, video_tiles)
from lvita.data.planned import ImageHeader, Planned, PlannedImage
from lvita.data.template import encode_conversation
from lvita.data.tokenizer import load_tokenizer, special_token_ids
from lvita.model.formats import INTERNVL, LONGVITA, ModelFormat


@dataclass
class Fitted:
    """A conversation encoded with its media planned at the chosen tile budget."""
    ids: list[int]
    targets: list[int]  # shifted: targets[t] is what position t predicts (-100: not learned)
    media: list[Planned]
    fits: bool  # len(ids) <= the limit (False: too long even at the smallest budget)


def tile_budgets(first: int, min_tiles: int) -> list[int]:
    """``first``, then halved down to ``min_tiles``: the tile budgets tried while a sample is too long."""
    out = [first]
    while out[-1] > min_tiles:
        out.append(max(min_tiles, out[-1] // 2))
    return out


class InputFormat:
    """A model format's input layout bound to a tokenizer (abstract: :class:`InternVLInput`,
    :class:`LongVitaInput`). ``tile``: tile side in pixels; ``tokens_per_tile``: tokens a tile becomes."""
    model_format: ClassVar[ModelFormat]
    frames: ClassVar[FrameRule]
    thumbnail_first: ClassVar[bool]  # tile order of a multi-tile image: thumbnail first (else last)
    # benchmark prompts as released Long-VITA's VLMEvalKit wrapper builds them (lvita.evaluation.prompts), else
    # InternVL's VLMEvalKit layout
    wrapper_prompts: ClassVar[bool]

    def __init__(self, tok, specials: dict, tile: int, tokens_per_tile: int, spec=None):
        self.tok, self.specials, self.tile, self.tpt = tok, specials, tile, tokens_per_tile
        self.spec = spec  # the model description it was built for (lvita.model.presets.ModelSpec), if any
        vocab = tok.get_vocab()  # the format's tokens are there: special_token_ids checked them
        # the ids whose positions take vision features (every one this format writes)
        self.context_ids: tuple[int, ...] = tuple(int(vocab[t]) for t in self.model_format.context_tokens)

    @staticmethod
    def load(spec, tokenizer_path) -> "InputFormat":
        """The one bring-up: the tokenizer with the format's tokens added, its special ids, the tile size."""
        return InputFormat.of(spec, load_tokenizer(tokenizer_path, spec.format))

    @staticmethod
    def of(spec, tok) -> "InputFormat":
        """For a tokenizer already loaded with the format's tokens (``spec``: a ModelSpec or preset name)."""
        from lvita.model.presets import spec_of, tile_size, tokens_per_tile

        spec = spec_of(spec)
        return INPUT_FORMATS[spec.format](tok, special_token_ids(tok, spec.format), tile_size(spec),
                                          tokens_per_tile(spec), spec)

    # -- tiles ------------------------------------------------------------------------------------
    def first_budget(self, n_images: int, min_tiles: int, max_tiles: int) -> int:
        raise NotImplementedError

    def image_tokens(self, m: PlannedImage) -> int:
        """Tokens one planned image takes in the sequence (markers, context runs, row newlines)."""
        raise NotImplementedError

    def plan_image(self, header: ImageHeader, min_tiles: int, max_tiles: int) -> PlannedImage:
        return PlannedImage(header.ref, max_tiles, *tile_grid(header.width, header.height, min_tiles, max_tiles,
                                                              self.tile))

    def fit(self, messages: list[dict], system_prompt: str | None, found: list, min_tiles: int, max_tiles: int,
            limit: int) -> Fitted:
        """Encode ``messages`` with ``found`` (per placeholder in order: an :class:`ImageHeader` or a
        :class:`PlannedVideo`) at the largest tile budget, halving from :meth:`first_budget` down to
        ``min_tiles``, at which it is at most ``limit`` tokens; tiles are reduced before a sample is
        given up. ``fits`` is False when even ``min_tiles`` is too long (the caller decides)."""
        headers = [m for m in found if isinstance(m, ImageHeader)]
        budgets = tile_budgets(self.first_budget(len(headers), min_tiles, max_tiles), min_tiles) if headers \
            else [max_tiles]

        def media_at(budget: int) -> list[Planned]:
            return [self.plan_image(m, min_tiles, budget) if isinstance(m, ImageHeader) else m for m in found]

        media = media_at(budgets[0])
        ids, targets = self.encode(messages, system_prompt, media)
        if len(ids) > limit and len(budgets) > 1:
            text = len(ids) - sum(self.image_tokens(m) for m in media if isinstance(m, PlannedImage))
            for budget in budgets[1:]:
                media = media_at(budget)
                if text + sum(self.image_tokens(m) for m in media if isinstance(m, PlannedImage)) <= limit:
                    break
            ids, targets = self.encode(messages, system_prompt, media)
        return Fitted(ids, targets, media, len(ids) <= limit)

    # -- text -------------------------------------------------------------------------------------
    def encode(self, messages: list[dict], system_prompt: str | None, media: list[Planned]) -> tuple[list, list]:
        """-> (ids, targets) of a whole conversation; ``media`` per placeholder in text order."""
        raise NotImplementedError

    def prompt_ids(self, messages: list[dict], system_prompt: str | None, media: list[Planned]) -> list[int]:
        """Messages ending with the user's turn -> ids ending in the open assistant turn."""
        return self.encode(messages, system_prompt, media)[0] + self.opening()

    def opening(self) -> list[int]:
        """``<|im_start|>assistant\\n``: the open assistant turn a prompt ends with."""
        return [self.specials["im_start"]] + self.tok.encode("assistant\n", add_special_tokens=False)

    # -- pixels -----------------------------------------------------------------------------------
    def video_frames(self, source, max_frames: int, fps: float, window: dict | None = None) -> int:
        """Frames a video gives (metadata only); ``window``: start/end seconds, folder_fps."""
        return video_frame_count(source, max_frames, fps, self.frames, **(window or {}))

    def medium_tiles(self, m: Planned, source, min_tiles: int, keep=None, window: dict | None = None) -> torch.Tensor:
        """(n, 3, tile, tile) uint8 of one planned medium read from ``source`` (its path or bytes), in
        token order; ``keep``: only these tiles. Another tile count than planned is a MediaError."""
        if isinstance(m, PlannedImage):
            return image_tiles(source, self.tile, min_tiles, m.max_tiles, keep, m.tiles,
                               thumbnail_first=self.thumbnail_first)
        return video_tiles(source, self.tile, m.max_frames, m.fps, keep, m.tiles, frames=self.frames,
                           **(window or {}))

    def frame_tile(self, img):
        """One frame image (PIL) -> its tile, as this format's videos are prepared."""
        return self.frames.tile(img, self.tile)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tile={self.tile}, tokens_per_tile={self.tpt})"


class InternVLInput(InputFormat):
    model_format = INTERNVL
    frames = INTERNVL_FRAMES
    thumbnail_first = False
    wrapper_prompts = False

    def first_budget(self, n_images: int, min_tiles: int, max_tiles: int) -> int:
        return max(min_tiles, max_tiles // max(n_images, 1))  # InternVL shares data.max_tiles out

    def image_tokens(self, m: PlannedImage) -> int:
        return self.tpt * m.tiles + 2  # one <img> run: <img> + context + </img>

    def encode(self, messages, system_prompt, media):
        groups = [[self.tpt * m.tiles] if isinstance(m, PlannedImage) else [self.tpt] * m.frames for m in media]
        return encode_conversation(messages, self.tok, self.specials, system_prompt, groups)


class LongVitaInput(InputFormat):
    model_format = LONGVITA
    frames = LONGVITA_FRAMES
    thumbnail_first = True
    wrapper_prompts = True

    def __init__(self, tok, specials: dict, tile: int, tokens_per_tile: int, spec=None):
        super().__init__(tok, specials, tile, tokens_per_tile, spec)
        self.newline = tok("\n", add_special_tokens=False)["input_ids"]

    def first_budget(self, n_images: int, min_tiles: int, max_tiles: int) -> int:
        return max_tiles  # the released layout gives every image max_tiles

    def image_tokens(self, m: PlannedImage) -> int:
        return len(longvita.image_run(self.specials, m.cols, m.rows, self.tpt, self.newline))

    def encode(self, messages, system_prompt, media):
        return longvita.encode_conversation(messages, self.tok, self.specials, system_prompt, media, self.tpt)


INPUT_FORMATS: dict[ModelFormat, type[InputFormat]] = {INTERNVL: InternVLInput, LONGVITA: LongVitaInput}
