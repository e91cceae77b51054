"""Model FLOPs (lvita.model.flops): a hand count for the tiny model, every matmul autograd runs counted
by torch's FlopCounterMode for four trainable sets, causal pairs by packing mode, and the GPU peak."""
from __future__ import annotations

import pytest
import torch

from lvita.model.flops import PEAK_TFLOPS, Shapes, causal_pairs, peak_tflops, segment_lengths, sequence_flops

ALL = ["vision", "projector", "llm"]


def test_hand_count_for_the_tiny_model():
    """One packed row of 128 tokens (samples of 60 and 68), 2 tiles, 78 labelled, everything trains."""
    # tiny: LLM hidden 160, 4 heads x 40 (q 160), 2 KV heads (kv 80), MLP 432, 4 layers, vocab 2048;
    # InternViT hidden 64, MLP 256, 2 layers, 112 px / 14 px patches = 64 patches + CLS; 16 tokens per tile
    layer = 2 * 128 * (160 * 160 + 160 * 80 + 160 * 80 + 160 * 160 + 3 * 160 * 432)  # q k v o gate up down
    pairs = 60 * 61 // 2 + 68 * 69 // 2
    attention = 4 * 160 * pairs  # QK^T and AV over causal pairs
    decoder = 4 * (3 * layer + 3 * attention)  # forward, input grad, weight grad; attention fwd + 2x bwd
    patch = 2 * 64 * (3 * 14 * 14) * 64 * 2  # forward + weight grad (pixels need none)
    vit_layer = 2 * 65 * (4 * 64 * 64 + 2 * 64 * 256) * 3
    vit_attention = 4 * 65 * 65 * 64 * 3
    vision = 2 * (patch + 2 * (vit_layer + vit_attention))
    projector = 2 * 2 * 16 * (256 * 160 + 160 * 160) * 3
    head = 2 * 78 * 160 * 2048 * 3
    got = sequence_flops(Shapes.of("tiny"), ALL, 128, causal_pairs([60, 68]), 2, 78)
    assert got == {"vision": vision, "projector": projector, "decoder": decoder, "head": head}


def _counted_step(model) -> tuple[int, torch.Tensor]:
    """torch's FLOP count of one forward + backward of ``model`` on a fixed 128-token packed row (two samples,
    32 image tokens of 2 tiles, the first 50 positions unlabelled); -> (count, position ids)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(10, 1000, (1, 128))
    ids[0, 4:36] = 5
    pos = torch.cat([torch.arange(60), torch.arange(68)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, :50] = -100
    with FlopCounterMode(display=False) as counter:
        loss, n = model(ids, pos, torch.randn(2, 3, 112, 112), labels)
        loss.backward()
    return counter.get_total_flops(), pos


@pytest.mark.parametrize("trainable", [ALL, ["projector"], ["projector", "llm"], ["vision"]],
                         ids=["all", "projector", "projector+llm", "vision"])
def test_matmuls_equal_what_autograd_runs(trainable):
    """Every matmul and convolution of a forward + backward, counted by torch (attention kernels are
    not counted there, so they are left out on both sides; the full head computes every position)."""
    from lvita.model.longvita import LongVita
    from lvita.training.optim import freeze

    model = LongVita("tiny", 5, logits_chunk=0)
    freeze(model, trainable)
    counted, pos = _counted_step(model)
    s = Shapes.of("tiny")
    pairs = causal_pairs(segment_lengths(pos[0]))
    parts = sequence_flops(s, trainable, 128, pairs, 2, 128)  # full head: all 128 positions
    upstream = 3  # something trains before the decoder in every case here
    attention = s.layers * 4 * s.q * pairs * upstream + 2 * s.v_layers * 4 * s.v_tokens ** 2 * s.v_hidden * (
        3 if "vision" in trainable else 1)
    assert counted == sum(parts.values()) - attention


@pytest.mark.parametrize("trainable,lora", [
    ([], dict(rank=16)), ([], dict(rank=4, llm=["q_proj", "down_proj"])),
    (["projector"], dict(rank=8, llm=["o_proj"]))],
    ids=["lora-all7", "lora-q-down", "lora-o+projector"])
def test_lora_matmuls_equal_what_autograd_runs(trainable, lora):
    """Under LoRA the frozen base weights get no weight gradient, input gradients still flow through every
    layer (but not into the first layer's input when nothing before it trains), the adapters' own matmuls
    run forward, both weight gradients and both input gradients. Exact counts: torch counts every matmul."""
    from lvita.config.schema import LoraConfig
    from lvita.model.longvita import LongVita
    from lvita.model.lora import add_adapters
    from lvita.training.optim import freeze

    lora = LoraConfig(**lora)
    model = LongVita("tiny", 5, logits_chunk=0)
    add_adapters({0: model.embed, **{i + 1: m for i, m in enumerate(model.layers)}, 5: model.head}, lora, seed=0)
    freeze(model, trainable, lora)
    counted, pos = _counted_step(model)
    s = Shapes.of("tiny")
    pairs = causal_pairs(segment_lengths(pos[0]))
    parts = sequence_flops(s, trainable, 128, pairs, 2, 128, lora)
    # attention kernels are not counted by torch: forward + 2x backward in the decoder, forward in the frozen tower
    attention = s.layers * 4 * s.q * pairs * 3 + 2 * s.v_layers * 4 * s.v_tokens ** 2 * s.v_hidden
    assert counted == sum(parts.values()) - attention
    full = sum(sequence_flops(s, ["projector", "llm"], 128, pairs, 2, 128).values()) - attention
    assert counted < 0.9 * full  # no weight gradients for the frozen base weights


def test_segments_follow_the_packing_mode():
    reset = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    assert segment_lengths(reset) == [3, 2, 4]
    assert segment_lengths(torch.arange(9)) == [9]  # preserved positions: one causal row
    assert causal_pairs([3, 2, 4]) == 6 + 3 + 10 and causal_pairs([9]) == 45


def test_peak_tflops(monkeypatch):
    assert peak_tflops(123.0) == 123.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_tflops() is None  # CPU: no MFU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, want in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert peak_tflops() == want, name
    assert dict(PEAK_TFLOPS)["H100"] == 989.0
