"""Small synthetic packed batches for model and pipeline tests (no tokenizer, no files)."""
from __future__ import annotations

import torch

from lvita.data.packer import PackedSequence
from lvita.model.presets import tile_size, tokens_per_tile

IMG = 5  # <IMG_CONTEXT> id used in tests


def packed_batch(n_seqs: int, length: int, seed: int, reset: bool = True, preset: str = "tiny",
                 images_every: int = 2) -> list[PackedSequence]:
    """n_seqs sequences of ``length`` tokens, 2-3 samples each, one image in every other sample."""
    g = torch.Generator().manual_seed(seed)
    tpt, tile = tokens_per_tile(preset), tile_size(preset)
    seqs = []
    for i in range(n_seqs):
        cuts = sorted(torch.randperm(length - 40, generator=g)[:2].add(20).tolist())
        bounds = [0, *cuts, length]
        ids = torch.randint(10, 1000, (length,), generator=g)
        pos = torch.empty(length, dtype=torch.long)
        tiles = []
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            pos[a:b] = torch.arange(b - a) if reset else torch.arange(a, b)
            if (i + j) % images_every == 0 and b - a > tpt + 4:
                ids[a + 2: a + 2 + tpt] = IMG
                tiles.append(torch.randn(1, 3, tile, tile, generator=g))
        targets = torch.randint(10, 1000, (length,), generator=g)
        targets[torch.rand(length, generator=g) < 0.5] = -100
        targets[ids == IMG] = -100
        pix = torch.cat(tiles) if tiles else torch.zeros(0, 3, tile, tile)
        seqs.append(PackedSequence(ids, pos, targets, pix))
    return seqs


def tiny_input(tok, fmt=None):
    """The tiny preset's input format (lvita.data.input_format) on a loaded tokenizer; ``fmt``: a
    ModelFormat or its name (default: the tiny preset's own, InternVL)."""
    from lvita.data.input_format import InputFormat
    from lvita.model.presets import spec_of

    return InputFormat.of(spec_of("tiny", fmt), tok)
