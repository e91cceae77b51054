"""KV-head replication: Ulysses degree 4 with the ``tiny`` preset's 2 KV heads (longvita-1.5b has 2
KV heads too, so any single-node long-context run of it takes this path). Each rank gets one query
head and must receive the KV head that query head uses in GQA. Loss and every gradient equal the
plain single-process model's in fp32 within 1e-5 (relative to each tensor's largest entry)."""
from __future__ import annotations

import torch

from lvita.model.presets import llm_config
from lvita.parallel.ulysses import replicate_kv
from tests.distributed import run_world
from tests.test_pipeline import _check, _reference_for
from tests.test_sequence_parallel import _sp_loss_and_grads


def test_replicate_kv_gives_each_query_head_its_own_kv_head():
    """Query heads h*rep..(h+1)*rep-1 use KV head h (GQA); after replication to the degree and a
    head scatter, rank r holds query head r and KV head r, which must be KV head r // (Hq / Hkv)."""
    cfg = llm_config("tiny")
    hq, hkv, degree = cfg.num_attention_heads, cfg.num_key_value_heads, 4
    assert hkv < degree <= hq  # the case this file is about
    k = torch.arange(hkv).float().view(1, 1, hkv, 1).expand(1, 3, hkv, 2)  # entry = KV head index
    k4, v4 = replicate_kv(k, k.clone(), degree)
    assert k4.shape == (1, 3, degree, 2) and torch.equal(k4, v4)
    for r in range(degree):  # one query head per rank at degree == Hq
        assert torch.all(k4[:, :, r] == r * hq // degree // (hq // hkv))
    assert replicate_kv(k, k, 2)[0] is k  # Hkv >= degree: unchanged


def test_ulysses_4_with_2_kv_heads_matches_plain_model():
    """4 gloo processes, one sequence group of 4, packed samples with reset position ids."""
    assert llm_config("tiny").num_key_value_heads == 2
    ref_loss, ref_grads = _reference_for(True)
    _check(run_world(_sp_loss_and_grads, 4, 1, 4, 1, True), ref_loss, ref_grads)
