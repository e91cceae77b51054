"""LoRA (model.lora, lvita.model.lora): PEFT's layer against a hand computation, the merge as a pure function,
and the adapted model's loss and adapter gradients at pipeline 2, data parallel 2 (pipeline engine), Ulysses 2,
ring 2 and Ulysses x ring with the memory levers (ZeRO-3 engine) against the single-process model; frozen
weights get no gradient. The trainer's LoRA runs (resume, universal, exports) are tested in test_lora_resume.py
and test_lora_export.py."""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from lvita.config.schema import LoraConfig
from lvita.data.stream import collate
from lvita.model.lora import add_adapters, adapter_state, check_targets, is_adapter, merged, scaling, trains
from tests.distributed import run_world
from tests.synthetic import IMG, packed_batch
from tests.test_pipeline import GLOBAL, LENGTH, SEED, _check
from tests.tolerances import within

LORA = LoraConfig(rank=4, alpha=8.0, llm=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                  projector=["all"])
TRAINABLE: list[str] = []  # only adapters train


def test_lora_layer_equals_the_hand_computation():
    """y = x W^T + b + (alpha / r) (x A^T) B^T and its gradients written out by hand. fp32 over sums of 3-7
    terms: noise ~1e-7 relative; a bug (scale r / alpha or 1, A and B swapped, dropout on) moves y by O(1)."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.down_proj = base  # a name the llm's targets match
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    lora = LoraConfig(rank=3, alpha=6.0, llm=["down_proj"])
    assert add_adapters({1: block}, lora, seed=0) == 1
    layer = block.mlp.down_proj
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert bb.abs().max() == 0  # PEFT starts B at zero: the adapted model starts equal to the base
    with torch.no_grad():
        bb.copy_(torch.randn_like(bb))
    x = torch.randn(2, 6, 7, requires_grad=True)
    g = torch.randn(2, 6, 5)
    y = layer(x)
    s = 6.0 / 3
    ref = x.detach() @ w.T + b + s * (x.detach() @ a.detach().T) @ bb.detach().T
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    (y * g).sum().backward()
    xf, gf = x.detach().reshape(-1, 7), g.reshape(-1, 5)
    grad_b = s * gf.T @ (xf @ a.detach().T)  # (out, r)
    grad_a = s * (gf @ bb.detach()).T @ xf  # (r, in)
    grad_x = gf @ w + s * (gf @ bb.detach()) @ a.detach()
    torch.testing.assert_close(bb.grad, grad_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, grad_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.reshape(-1, 7), grad_x, rtol=1e-5, atol=1e-6)
    assert layer.base_layer.weight.grad is None  # PEFT's injection freezes the block; freeze() then sets every flag
    assert scaling(lora) == s


def _reference_model(reset: bool = True):
    from lvita.ckpt.weights import local_blocks
    from lvita.parallel.pipeline import to_sequential
    from lvita.training.optim import freeze

    model = to_sequential("tiny", IMG, SEED)
    add_adapters(local_blocks(model), LORA, SEED)
    _perturb(local_blocks(model))
    freeze(model, TRAINABLE, LORA)
    return model


def _perturb(blocks: dict) -> None:
    """Every lora_B from zero to seeded values named by (block, parameter): the same in every layout, and
    gradients reach lora_A (with B = 0 they would be 0 and any A-side bug would pass)."""
    for b, block in blocks.items():
        for name, p in block.named_parameters():
            if ".lora_B." in name:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{b}.{name}".encode()))
                with torch.no_grad():
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _reference(reset: bool = True, reduction: str = "token", length: int = LENGTH):
    model = _reference_model()
    if reduction == "token":
        ids, pos, pix, tgt = collate(packed_batch(GLOBAL, length, seed=3, reset=reset))
        loss_sum, n = model(ids, pos, pix, tgt)
        loss = loss_sum / n
    else:
        loss = torch.stack([(lambda s, n: s / n)(*model(*collate([row])))
                            for row in packed_batch(GLOBAL, LENGTH, seed=3, reset=reset)]).mean()
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_only_adapters_and_trainable_modules_train():
    model = _reference_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(is_adapter(n) for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    # 4 layers x 5 projections + the projector's two linears (internvl: linear_1, linear_2)
    assert len(adapted) == 4 * 5 + 2, sorted(adapted)
    assert not any(".k_proj" in n or ".up_proj" in n or "lm_head" in n for n in names)
    assert trains("layers.0.layer.mlp.up_proj.weight", ["llm"], None)
    assert not trains("layers.0.layer.self_attn.q_proj.base_layer.weight", ["llm"], LORA)


def test_merge_is_w_plus_scaled_b_a_and_gives_the_unmerged_model():
    """merged(): the plain model loaded with the merged state gives the adapted model's loss; and each merged
    weight is W + alpha/r B A exactly as written. fp32: noise ~1e-6 relative on the loss; a merge without the
    scale (or with r/alpha) moves the loss by ~1e-3 at these adapter sizes (0.05 x randn B)."""
    from lvita.parallel.pipeline import to_sequential

    model = _reference_model()
    state = model.state_dict()
    plain = merged(state, scaling(LORA))
    assert not any(is_adapter(k) or ".base_layer." in k for k in plain)
    key = "layers.1.layer.self_attn.q_proj.weight"
    a, b = adapter_state(state)[key]
    w = state["layers.1.layer.self_attn.q_proj.base_layer.weight"]
    torch.testing.assert_close(plain[key], w + 2.0 * b @ a, rtol=0, atol=1e-7)
    base = to_sequential("tiny", IMG, SEED)
    base.load_state_dict(plain)
    ids, pos, pix, tgt = collate(packed_batch(GLOBAL, LENGTH, seed=3))
    with torch.no_grad():
        got = (lambda s, n: s / n)(*base(ids, pos, pix, tgt)).item()
        want = (lambda s, n: s / n)(*model(ids, pos, pix, tgt)).item()
        unscaled = merged(state, 1.0)
        base.load_state_dict(unscaled)
        wrong = (lambda s, n: s / n)(*base(ids, pos, pix, tgt)).item()
    assert within(abs(got - want), 1e-6 * abs(want)), (got, want)
    assert abs(wrong - want) > 100 * 1e-6 * abs(want), (wrong, want)  # the check above can fail


def test_unknown_target_names_the_valid_ones():
    from lvita.errors import ConfigError
    from lvita.model.longvita import build_blocks

    with torch.device("meta"):
        blocks = build_blocks("tiny", IMG, 0)
    with pytest.raises(ConfigError, match=r"model.lora.llm: .*'qkv'.*valid: .*down_proj.*q_proj"):
        check_targets(blocks, LoraConfig(llm=["qkv"]))
    with pytest.raises(ConfigError, match=r"model.lora.projector: .*valid: linear_1, linear_2"):
        check_targets(blocks, LoraConfig(llm=[], projector=["mlp.0"]))
    assert check_targets(blocks, LORA) == {"vision": 0, "projector": 2, "llm": 20}


# -- the engines against the single-process model ------------------------------------------------------------

def _adapt(module) -> None:
    """What the trainer does after the build (lvita.training.loop), for the engine tests' ``prepare``: adapters on
    the blocks this rank owns, seeded per block, lora_B perturbed alike everywhere, everything else frozen."""
    from lvita.ckpt.weights import local_blocks
    from lvita.training.optim import freeze

    add_adapters(local_blocks(module), LORA, SEED)
    _perturb(local_blocks(module))
    freeze(module, TRAINABLE, LORA)


def _pipeline_lora(rank, pp, ulysses, ring, reset, reduction="token"):
    from tests.test_sequence_parallel import _sp_loss_and_grads

    return _sp_loss_and_grads(rank, pp, ulysses, ring, reset, reduction, prepare=_adapt)


def _zero3_lora(rank, ulysses, ring, reset, levers=False, length=LENGTH):
    from tests.test_zero_engine import _zero_loss_and_grads

    return _zero_loss_and_grads(rank, 3, ulysses, ring, reset, levers=levers, length=length, prepare=_adapt)


# Tolerance: tests/test_pipeline.py's RTOL (1e-5 of each tensor's largest entry). Noise: the same fp32 sums in
# another order (micro-batches, stages, ranks, shards), ~1e-7..1e-6; bug: an unscaled sequence or data rank halves
# every adapter gradient (0.5), adapters seeded per rank instead of per block change them by O(1), a lost
# micro-batch by ~1/GLOBAL.

def test_lora_pipeline_2_matches_the_plain_model():
    ref_loss, ref_grads = _reference()
    _check(run_world(_pipeline_lora, 2, 2, 1, 1, True), ref_loss, ref_grads)


def test_lora_data_parallel_2_matches_the_plain_model_with_the_sequence_reduction():
    ref_loss, ref_grads = _reference(reduction="sequence")
    _check(run_world(_pipeline_lora, 2, 1, 1, 1, True, "sequence"), ref_loss, ref_grads)


def test_lora_ulysses_2_under_zero3_matches_the_plain_model():
    ref_loss, ref_grads = _reference()
    _check(run_world(_zero3_lora, 2, 2, 1, True), ref_loss, ref_grads)


def test_lora_ring_2_with_checkpointing_and_tiled_mlp_under_zero3_matches_the_plain_model():
    """672 tokens a sequence: 336 local tokens per ring rank, 3 TiledMLP shards of the tiny model's hidden 160 (ZeRO-3
    must hold each adapter's gradient until the last shard: passing TiledMLP the frozen base weights instead of
    the adapters loses all but one shard's gradient)."""
    long = 4 * 168
    ref_loss, ref_grads = _reference(reset=False, length=long)
    _check(run_world(_zero3_lora, 2, 1, 2, False, True, long), ref_loss, ref_grads)


def test_lora_pipeline_2_x_ulysses_2_matches_the_plain_model():
    ref_loss, ref_grads = _reference()
    _check(run_world(_pipeline_lora, 4, 2, 2, 1, True), ref_loss, ref_grads)


# -- the trainer ----------------------------------------------------------------------------------------------

def _optimizer_fp32_elements(tag_dir) -> int:
    """fp32 elements (master weights and Adam moments; step counters left out) in a checkpoint's optimizer files."""
    total = 0

    def walk(x):
        nonlocal total
        if torch.is_tensor(x):
            total += x.numel() if x.dtype == torch.float32 and x.numel() > 1 else 0
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for f in sorted(tag_dir.glob("*optim_states.pt")):
        walk(torch.load(f, map_location="cpu", weights_only=False))
    return total


def test_bf16_engines_keep_fp32_state_for_the_adapters_only_and_train_them(tmp_path, tokenizer_dir, dataset_dir):
    """A LoRA stage (rank 4 on the llm's 7 projections, nothing else trains) under the bf16 pipeline engine
    (BF16_Optimizer) and bf16 ZeRO-3: the checkpoints' optimizer files hold fp32 master weights and two Adam
    moments for the adapters' 46,336 elements and nothing more (full training of the same model holds them for
    all ~2.4M), the frozen weights are stored in bf16, and the step-1 gradient norm equals fp32's. Tolerance 1%:
    noise, bf16 rounding of this tiny model's gradients (measured 0.17%: 1.794 vs 1.797); bug, BF16_Optimizer
    clearing the adapters' gradients (as it once did the LM head's) drops the norm to 0 or by far more."""
    from lvita.ckpt.weights import read_block
    from tests.conftest import REPO, stage_dict, write_stage
    from tests.test_training import _metrics, _train

    cfg = stage_dict(tokenizer_dir, dataset_dir, tmp_path / "x", iterations=1)
    cfg["model"].update(trainable=[], lora={"rank": 4, "alpha": 8})
    stage = str(write_stage(tmp_path / "s.json", cfg))
    norms = {}
    for name, precision, ds in (("fp32", "fp32", "pipeline_fp32_cpu"), ("bf16", "bf16", "pipeline_bf16_zero1"),
                                ("zero3", "bf16", "zero3_bf16")):
        out = tmp_path / name
        run_world(_train, 1, stage, [f"precision={precision}", f"deepspeed={REPO / 'ds_configs' / f'{ds}.json'}",
                                     f"output_dir={out}"])
        norms[name] = _metrics(out)[0]["grad_norm"]
        tag = out / "checkpoints" / "global_step1"
        raw = {f"{b}.{k}": v for b in range(6) for k, v in read_block(tag, b, merge=False).items()}
        n_adapters = sum(v.numel() for k, v in raw.items() if is_adapter(k))
        assert n_adapters == 46336, n_adapters  # 4 layers x rank 4 x (7 x in + out widths of the projections)
        if precision == "bf16":
            assert _optimizer_fp32_elements(tag) == 3 * n_adapters, (name, _optimizer_fp32_elements(tag))
            frozen = [k for k, v in raw.items() if not is_adapter(k) and v.is_floating_point()]
            assert frozen and all(raw[k].dtype == torch.bfloat16 for k in frozen)
    assert norms["bf16"] == pytest.approx(norms["fp32"], rel=1e-2), norms
    assert norms["zero3"] == pytest.approx(norms["fp32"], rel=1e-2), norms


LORA_ERRORS = {  # --set overrides on a good stage -> what the one error line names
    "rank 0": (['model.lora={"rank": 0}', "model.trainable=[]"], "model.lora.rank=0"),
    "unknown target": (['model.lora={"llm": ["qkv"]}', "model.trainable=[]"], "model.lora.llm: no linear layer"),
    "adapted and fully trained": (["model.lora={}"], "model.lora.llm adapts the llm, which model.trainable"),
    "no rate": (['model.lora={"llm": [], "vision": ["fc1"]}', "model.trainable=[]", 'train.lr={"llm": 0.001}'],
                "train.lr has no rate for the vision's adapters"),
    "nothing adapted": (['model.lora={"llm": []}', "model.trainable=[]"], "model.lora names no linear layer"),
}


@pytest.mark.parametrize("case", sorted(LORA_ERRORS))
def test_bad_lora_settings_are_one_error_line(case, tmp_path, tokenizer_dir, dataset_dir):
    from tests.conftest import stage_dict, write_stage
    from tests.distributed import run_command
    from tests.test_cli_errors import _assert_one_clear_error

    stage = write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out"))
    sets, names = LORA_ERRORS[case]
    code, _, stderr = run_command(["train", "--stage", str(stage), *[x for s in sets for x in ("--set", s)]], tmp_path)
    _assert_one_clear_error(code, stderr, names)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_resume_refuses_other_adapters_and_full_training(tmp_path, tokenizer_dir, dataset_dir):
    from tests.conftest import stage_dict, write_stage
    from tests.distributed import run_command
    from tests.test_cli_errors import _assert_one_clear_error
    from tests.test_training import _train

    cfg = stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out", iterations=1)
    cfg["model"].update(trainable=[], lora={"rank": 4, "alpha": 8})
    stage = write_stage(tmp_path / "s.json", cfg)
    run_world(_train, 1, str(stage), [])
    for sets, names in ((["model.lora.rank=8"], "saved with model.lora"),
                        (["model.lora=null", 'model.trainable=["llm"]'], "saved with LoRA adapters"),
                        (["train.iterations=2"], None)):
        argv = ["train", "--stage", str(stage), *[x for s in sets for x in ("--set", s)]]
        code, out, stderr = run_command(argv, tmp_path)
        if names is None:  # the same adapters resume
            assert code == 0 and "resumed from" in out, stderr[-2000:]
        else:
            _assert_one_clear_error(code, stderr, names)


def test_lora_hybrid_ulysses_2_x_ring_2_under_zero3_matches_the_plain_model():
    """yunchang's hybrid attention (Ulysses 2 x ring 2, 4 ranks), positions kept: the same tolerance as above."""
    ref_loss, ref_grads = _reference(reset=False)
    _check(run_world(_zero3_lora, 4, 2, 2, False), ref_loss, ref_grads)


def _hostile_lora(rng) -> dict:
    """A seeded model.lora as users (and hand-edited files) bring it: each key absent, right, or wrong in type or
    range; target lists with real, unknown, empty and non-string names; now and then an unknown key."""
    names = ["q_proj", "down_proj", "all", "qkv", "", "mlp.0", "linear_1", "fc1", 3, None]
    pools = {"rank": [4, 16, 0, -2, 2.5, "8", None, True, [4]],
             "alpha": [8, 32.0, 0, -1, "x", None, {}],
             "dropout": [0, 0.1, 1, -0.5, 1.5, "0", None],
             "llm": [None, [], "q_proj", {"q": 1}] + [[rng.choice(names) for _ in range(rng.randint(1, 3))]] * 4,
             "vision": [[], ["fc1"], ["q_proj", "bogus"], 7],
             "projector": [[], ["all"], ["linear_1"], ["mlp.0"], [None]]}
    out = {k: rng.choice(v) for k, v in pools.items() if rng.random() < 0.7}
    if rng.random() < 0.15:
        out[rng.choice(["ranks", "target_modules", "Alpha"])] = 1
    return out


def test_seeded_hostile_lora_settings_end_as_a_stage_or_one_config_error(tmp_path, tokenizer_dir, dataset_dir):
    """200 seeded model.lora values (``LVITA_HOSTILE_SEED`` picks another run) through load_stage and validate,
    with model.trainable [] or unset: each is a valid stage or one ConfigError whose message is one line naming
    model.lora (or the key it broke); never another exception."""
    import json
    import os
    import random

    from lvita.config.schema import load_stage
    from lvita.config.validate import validate
    from lvita.errors import ConfigError
    from tests.conftest import stage_dict, write_stage

    stage = write_stage(tmp_path / "s.json", stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out"))
    rng = random.Random(int(os.environ.get("LVITA_HOSTILE_SEED", "0")))
    outcomes = {"ok": 0, "error": 0}
    for i in range(200):
        lora = _hostile_lora(rng)
        sets = [f"model.lora={json.dumps(lora)}"] + (["model.trainable=[]"] if rng.random() < 0.8 else [])
        try:
            validate(load_stage(stage, sets), 1)
            outcomes["ok"] += 1
        except ConfigError as e:
            msg = str(e)
            assert "model.lora" in msg or "model.trainable" in msg or "train.lr" in msg, (i, lora, msg)
            assert "Traceback" not in msg, (i, lora, msg)
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"], outcomes  # the generator reaches both ends


@pytest.mark.parametrize("lora", [None, {}, {"rank": 0, "alpha": 8}, {"rank": 4}, {"rank": 4, "alpha": "x"},
                                  {"rank": [4], "alpha": 8}])
def test_a_manifest_without_a_usable_lora_is_one_checkpoint_error(tmp_path, lora):
    """A checkpoint whose blocks hold adapters but whose manifest lost (or garbled) model.lora: readers that merge
    say so in one CheckpointError; the raw block (merge=False) still reads."""
    import json

    from lvita.ckpt.checkpoint import MANIFEST, CheckpointError
    from lvita.ckpt.weights import layer_file, read_block

    state = {"proj.base_layer.weight": torch.ones(3, 2), "proj.lora_A.default.weight": torch.ones(1, 2),
             "proj.lora_B.default.weight": torch.ones(3, 1)}
    torch.save(state, layer_file(tmp_path, 0))
    (tmp_path / MANIFEST).write_text(json.dumps({"lora": lora}))
    with pytest.raises(CheckpointError, match="holds LoRA adapters but its lvita_manifest.json records no usable"):
        read_block(tmp_path, 0)
    assert set(read_block(tmp_path, 0, merge=False)) == set(state)
    (tmp_path / MANIFEST).write_text(json.dumps({"lora": {"rank": 1, "alpha": 2}}))
    torch.testing.assert_close(read_block(tmp_path, 0)["proj.weight"], torch.full((3, 2), 3.0))  # 1 + 2 x 1
