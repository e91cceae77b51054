"""The prefill never builds (sequence x vocabulary) logits: only the last position goes through the
LM head (the paper's logits-masked head at inference). Checked on every tensor any op returns during
``prefill`` of a long prompt, as tests/test_lm_head.py checks the training head."""
from __future__ import annotations

import torch

from lvita.infer.decode import KVCache, prefill
from lvita.model.longvita import LongVita
from lvita.model.presets import llm_config
from tests.synthetic import IMG
from tests.test_lm_head import _LargestOutputs


def test_prefill_never_holds_sequence_times_vocab_logits():
    model = LongVita("tiny", IMG, seed=1).eval().requires_grad_(False)
    V, S = llm_config("tiny").vocab_size, 512
    ids = torch.randint(10, 1000, (1, S))
    cache = KVCache.empty(model, 1, S)
    ops = _LargestOutputs()
    with torch.no_grad(), ops:
        logits = prefill(model, ids, torch.zeros(0, 3, 112, 112), cache)
    assert logits.shape == (1, V) and cache.length == S
    weights = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    vocab_sized = [s for s in ops.shapes if V in s and s not in weights]
    assert vocab_sized, "the prefill computed no logits at all"
    assert all(torch.Size(s).numel() == V for s in vocab_sized), vocab_sized  # one position's logits only
    # the same prompt's full logits really are that big: the check can tell the cases apart
    with torch.no_grad(), _LargestOutputs() as full:
        model.head.lm_head(model.head(torch.zeros(1, S, model.head.lm_head.in_features)))
    assert max(torch.Size(s).numel() for s in full.shapes if V in s) >= S * V
