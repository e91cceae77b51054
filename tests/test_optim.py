"""LR schedule (warmup + cosine to a floor), per-module groups and freezing."""
from __future__ import annotations

import math

import pytest

from lvita.config.schema import TrainConfig
from lvita.model.longvita import LongVita
from lvita.training.optim import freeze, lr_factor, param_groups, scheduler_factory, build_optimizer


def test_warmup_then_cosine():
    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # pytest's default 1e-6: exact double arithmetic (noise 1e-16); bugs are off by a step (>= 1e-2)
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    mid = 4 + 8  # halfway through the cosine
    assert lr_factor(mid, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(25, 4, 20, 0.1) == pytest.approx(0.1)  # stays at the floor
    assert lr_factor(7, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.7)))


def test_scheduler_keeps_per_module_ratios():
    model = LongVita("tiny", image_token_id=5)
    train = TrainConfig(iterations=10, warmup_steps=2, min_lr_ratio=0.0,
                        lr={"vision": 1e-5, "projector": 1e-3, "llm": 1e-4}, weight_decay=0.1)
    freeze(model, ["vision", "projector", "llm"])
    groups = param_groups(model, train)
    assert {g["module"] for g in groups} == {"vision", "projector", "llm"}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(decay_of) == len(named)  # every trainable parameter in exactly one group
    decay = {n: decay_of[id(p)] for n, p in named.items()}
    biases = [n for n in named if n.endswith(".bias")]
    norms = [n for n in named if "norm" in n and n.endswith(".weight")]  # LayerNorm / RMSNorm scales
    assert len(biases) > 20 and len(norms) > 10
    assert {n: decay[n] for n in biases + norms} == {n: 0.0 for n in biases + norms}
    assert all(decay[n] == 0.0 for n, p in named.items() if p.ndim < 2)  # layer scales (lambda_1) too
    for n in ("layers.0.layer.self_attn.q_proj.weight", "layers.1.layer.mlp.down_proj.weight",
              "embed.vision.multi_modal_projector.linear_1.weight", "head.lm_head.weight",
              "embed.vision.vision_tower.encoder.layer.0.attention.q_proj.weight"):
        assert decay[n] == 0.1, n
    opt = build_optimizer(groups, train)
    sched = scheduler_factory(train)(opt)
    seen = []
    for _ in range(10):
        seen.append({g["module"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx({"vision": 0.5e-5, "projector": 0.5e-3, "llm": 0.5e-4})
    assert seen[2] == pytest.approx({"vision": 1e-5, "projector": 1e-3, "llm": 1e-4})
    for s in seen:
        assert s["projector"] / s["vision"] == pytest.approx(100)


def test_freeze_projector_only():
    model = LongVita("tiny", image_token_id=5)
    counts = freeze(model, ["projector"])
    assert counts["vision"] == 0 and counts["llm"] == 0 and counts["projector"] > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    assert not any(p.requires_grad for p in model.embed.embed_tokens.parameters())


def test_lr_of_a_run_shorter_than_its_warmup():
    """Every step of a 3-step run with 6 warmup steps: LR = t/6 of the base, finite and positive."""
    model = LongVita("tiny", image_token_id=5)
    train = TrainConfig(iterations=3, warmup_steps=6, min_lr_ratio=0.0, lr={"vision": 1e-4, "projector": 1e-3,
                                                                            "llm": 2e-3})
    freeze(model, ["vision", "projector", "llm"])
    opt = build_optimizer(param_groups(model, train), train)
    sched = scheduler_factory(train)(opt)
    for t in range(1, train.iterations + 1):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(train.lr[g["module"]] * t / 6, rel=1e-12)
        opt.step()
        sched.step()


def test_vision_layer_wise_lr_decay_per_parameter():
    """train.vision_lr_decay as Long-VITA stage 2's Megatron optimizer: a vision parameter of layer l (patch and
    position embeddings 0, encoder layer i -> i + 1, the class token L + 1) trains at lr.vision x scale x
    factor^(L + 1 - l); the projector and LLM keep their rates; the schedule scales every group alike."""
    model = LongVita("tiny", image_token_id=5)
    freeze(model, ["vision", "projector", "llm"])
    train = TrainConfig(iterations=10, warmup_steps=0, lr={"vision": 1e-5, "projector": 1e-3, "llm": 1e-4},
                        weight_decay=0.1, vision_lr_decay={"factor": 0.9, "scale": 0.1})
    groups = param_groups(model, train)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every trainable parameter in exactly one group
    L = 1 + max(int(n.split(".encoder.layer.")[1].split(".")[0]) for n in named if ".encoder.layer." in n)
    assert L == 2  # the tiny preset's vision depth: the expected values below are written for it
    vt = "embed.vision.vision_tower."
    # exact products of two floats; pytest.approx's 1e-6 sits far above their 1e-16 noise and far below the
    # 10% a layer off by one shows (factor 0.9)
    expected = {
        vt + "embeddings.patch_embeddings.projection.weight": 1e-5 * 0.1 * 0.9 ** 3,
        vt + "embeddings.position_embeddings": 1e-5 * 0.1 * 0.9 ** 3,
        vt + "encoder.layer.0.attention.q_proj.weight": 1e-5 * 0.1 * 0.9 ** 2,
        vt + "encoder.layer.0.layernorm_before.bias": 1e-5 * 0.1 * 0.9 ** 2,
        vt + "encoder.layer.1.mlp.fc2.weight": 1e-5 * 0.1 * 0.9,
        vt + "encoder.layer.1.lambda_2": 1e-5 * 0.1 * 0.9,
        vt + "embeddings.cls_token": 1e-5 * 0.1,
        "embed.vision.multi_modal_projector.linear_1.weight": 1e-3,
        "layers.0.layer.self_attn.q_proj.weight": 1e-4,
        "head.lm_head.weight": 1e-4,
    }
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(lr, rel=1e-6), name
    vision = [n for n in named if "vision_tower" in n]
    assert all(lr_of[id(named[n])] < 1e-5 * 0.1 + 1e-12 for n in vision)  # no vision parameter escaped the decay
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}  # decay still by parameter kind
    assert decay_of[id(named[vt + "encoder.layer.0.attention.q_proj.weight"])] == 0.1
    assert decay_of[id(named[vt + "encoder.layer.0.layernorm_before.bias"])] == 0.0
    opt = build_optimizer(groups, train)
    sched = scheduler_factory(train)(opt)
    for _ in range(4):
        opt.step()
        sched.step()
    factor = lr_factor(4, 0, 10, 0.0)
    for g in opt.param_groups:  # the schedule multiplies every group's own rate: the per-layer ratios hold
        assert g["lr"] == pytest.approx(train.lr[g["module"]] * g["lr_scale"] * factor, rel=1e-6)
