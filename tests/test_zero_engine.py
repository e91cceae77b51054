"""The ZeRO engine (lvita.parallel.zero): at pipeline 1 under ZeRO-2/3 the plain model runs on DeepSpeed's
DeepSpeedEngine. Layout invariance across engines: ZeRO-3 at data parallel 2, Ulysses 2, ring 2 and
Ulysses 2 x ring 2 (4 processes), ZeRO-2 at data parallel 2, and the pipeline engine at pipeline 2 give the
single-process model's loss and every gradient (ZeRO-3's gathered with deepspeed.utils.safe_get_full_grad);
the trainer under the ``deepspeed`` launcher (ZeRO-3, 2 processes) trains, saves the pipeline's per-block
weight files and the same client state, and a run killed by SIGKILL resumes exactly."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from lvita.data.stream import rank_micro_batches
from lvita.model.presets import tokens_per_tile
from tests.conftest import REPO, stage_dict, write_stage
from tests.distributed import launch_trainer, newest_step, run_world, sigkill_after
from tests.synthetic import IMG, packed_batch
from tests.test_pipeline import GLOBAL, LENGTH, SEED, _check, _pipeline_loss_and_grads, _reference_for
from tests.test_training import _layer_states, _metrics, _train

ZERO3_CPU = str(REPO / "ds_configs" / "zero3_fp32_cpu.json")


def _zero_loss_and_grads(rank, stage, ulysses, ring, reset, reduction="token", levers=False, length=LENGTH,
                         prepare=None):
    """One step of the ZeRO engine on ``packed_batch``: (loss, {plain name: full gradient}) of every trained
    parameter, read before the optimizer steps (lr 0). ``levers``: activation checkpointing (torch's, every decoder
    and InternViT layer and the projector) and DeepSpeed's TiledMLP, applied as the trainer applies them.
    ``prepare(module)``: a module-level function applied after the levers (the LoRA tests add adapters with it)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from lvita.model.attention import set_attention
    from lvita.parallel.hybrid import sequence_attention
    from lvita.parallel.sequence import shard_micro_batch
    from lvita.parallel.topology import build_topology, init_distributed
    from lvita.parallel.zero import ZeroSteps, build_zero_model

    init_distributed()
    topo = build_topology(1, ulysses, ring)
    module = build_zero_model("tiny", IMG, SEED, checkpoint=levers)
    if levers:
        from lvita.config.schema import ModelConfig
        from lvita.training.levers import apply_levers

        assert apply_levers(module, ModelConfig(tiled_mlp=True, activation_checkpointing=True))
    if topo.sequence > 1:
        set_attention(module, sequence_attention(topo))
    if prepare is not None:
        prepare(module)
    trained = [p for p in module.parameters() if p.requires_grad]
    gas = GLOBAL // topo.data
    world = topo.data * topo.sequence
    cfg = {"train_batch_size": gas * world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
           "steps_per_print": 10**9, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(trained, lr=0.0), config=cfg)
    if stage == 3:  # every weight is sharded (persistence threshold 0): rank 0 holds about half of the largest
        w = module.head.lm_head.weight
        assert w.numel() == 0 and 0 < w.ds_tensor.numel() <= w.ds_numel // world + 1, (w.shape, w.ds_numel)
    batch = packed_batch(GLOBAL, length, seed=3, reset=reset)
    micro = rank_micro_batches(batch, topo.data_rank, topo.data, 1, reduction)
    if topo.sequence > 1:
        micro = [shard_micro_batch(m, topo.sequence_rank, ulysses, ring, IMG, tokens_per_tile("tiny")) for m in micro]
    grads = {}

    def capture():  # collective under ZeRO-3: every rank gathers every gradient in the same order
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            g = safe_get_full_grad(p)
            grads[name] = g.detach().clone().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)

    loss = ZeroSteps(engine).train_batch(iter(micro), before_step=capture)
    return float(loss), grads


# Tolerance (every check below): _check uses tests/test_pipeline.py's RTOL, 1e-5 relative to each tensor's largest
# entry. Noise: fp32 sums in another order (micro-batches, ranks, ZeRO's bucketed reduce-scatter), ~1e-7..1e-6;
# bug: the sequence factor or DeepSpeed's accumulation division not undone halves (or doubles) every
# gradient (0.5), a lost micro-batch moves them by ~1/GLOBAL. (The LM head's weight, read by the loss rather
# than by lm_head's forward: without lvita's explicit registration these still pass, since DeepSpeed 0.19.8
# registers a weight read inside a forward by itself; checked by removing it.)

def test_zero3_data_parallel_2_matches_the_plain_model_and_pipeline_2():
    ref_loss, ref_grads = _reference_for(True)
    zero = run_world(_zero_loss_and_grads, 2, 3, 1, 1, True)
    _check(zero, ref_loss, ref_grads)
    pipe = run_world(_pipeline_loss_and_grads, 2, 2, 1)
    _check(pipe, ref_loss, ref_grads)
    # across engines directly: the same noise and bug bounds
    pipe_grads = {k: v for _, g in pipe for k, v in g.items()}
    _check(zero, pipe[-1][0], pipe_grads)


def test_zero2_data_parallel_2_matches_the_plain_model():
    ref_loss, ref_grads = _reference_for(True)
    _check(run_world(_zero_loss_and_grads, 2, 2, 1, 1, True), ref_loss, ref_grads)


def test_zero3_ulysses_2_matches_the_plain_model():
    ref_loss, ref_grads = _reference_for(True)
    _check(run_world(_zero_loss_and_grads, 2, 3, 2, 1, True), ref_loss, ref_grads)


@pytest.mark.parametrize("world,ulysses,ring", [(2, 1, 2), (4, 2, 2)])
def test_zero3_ring_and_hybrid_match_the_plain_model(world, ulysses, ring):
    """Zigzag ring 2 and yunchang's hybrid Ulysses 2 x ring 2 (preserved positions: one causal sequence)."""
    ref_loss, ref_grads = _reference_for(False)
    _check(run_world(_zero_loss_and_grads, world, 3, ulysses, ring, False), ref_loss, ref_grads)


# -- the trainer: the launcher, checkpoints, SIGKILL --------------------------------------------------------

def _client_state(tag_dir: Path) -> dict:
    """lvita's client state as DeepSpeed stored it (rank 0's model-states file: the pipeline engine's
    mp_rank_00_model_states.pt, the ZeRO-3 engine's zero_pp_rank_0_mp_rank_00_model_states.pt)."""
    (path,) = [p for p in tag_dir.glob("*mp_rank_00_model_states.pt") if "pp_rank" not in p.name
               or p.name.startswith("zero_pp_rank_0_")]
    return torch.load(path, map_location="cpu", weights_only=False)["lvita"]


def _launch(stage: Path, out: Path, *sets: str) -> subprocess.Popen:
    return launch_trainer(stage, out, f"deepspeed={ZERO3_CPU}", *sets)


def test_zero3_trainer_under_the_launcher_matches_the_pipeline_engine_and_resumes_after_sigkill(
        tmp_path, tokenizer_dir, dataset_dir):
    """4 steps at data parallel 2, saving every step: the pipeline engine (ZeRO-1) in-process; the ZeRO-3
    engine under the ``deepspeed`` launcher, killed with SIGKILL (every process) once step 2 is saved, then
    launched again. The ZeRO-3 run gives the pipeline run's losses and gradient norms, its checkpoints hold
    the pipeline's per-block weight files (the same weights) and the same client state, and the resumed
    run continues exactly."""
    cfg = stage_dict(tokenizer_dir, dataset_dir, tmp_path / "x", iterations=4, save_every=1)
    stage = write_stage(tmp_path / "s.json", cfg)
    ref = run_world(_train, 2, str(stage), [f"output_dir={tmp_path / 'pipe'}"])[0]

    out = tmp_path / "zero3"
    text = sigkill_after(_launch(stage, out), out / "checkpoints" / "global_step2" / "lvita_manifest.json")
    assert "ZeRO-3 engine (plain model, no pipeline)" in text
    # resume takes the newest tag with a manifest; ``latest`` is pointed just after the manifest, so the
    # kill may land between the two (the CI run that showed it read global_step1 from ``latest``)
    latest = newest_step(out / "checkpoints")
    assert 2 <= latest < 4, latest  # killed before the final step
    proc = _launch(stage, out)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'global_step{latest}'}" in text

    pipe, zero = _metrics(tmp_path / "pipe"), _metrics(out)
    assert [m["step"] for m in zero] == [1, 2, 3, 4]  # steps logged after the kill were rewritten on resume
    # noise: fp32 sums in another engine's order ~1e-7 (tests/README.md), and a resume repeats the same
    # arithmetic; bug: a lost Adam state or LR position moves the next loss by >= 1e-3, a data position
    # restarted by ~1e-1 (tests/test_resume.py), a missing sequence/accumulation factor halves the step
    assert [m["loss"] for m in zero] == pytest.approx(ref, rel=1e-5)
    assert [m["grad_norm"] for m in zero] == pytest.approx([m["grad_norm"] for m in pipe], rel=1e-5)
    assert [m["lr"] for m in zero] == [m["lr"] for m in pipe]

    manifest = json.loads((out / "checkpoints" / "global_step4" / "lvita_manifest.json").read_text())
    assert manifest["layout"]["zero_stage"] == 3 and manifest["layout"]["pipeline"] == 1
    a, b = _client_state(tmp_path / "pipe" / "checkpoints" / "global_step4"), \
        _client_state(out / "checkpoints" / "global_step4")
    assert a.keys() == b.keys() and a["step"] == b["step"] == 4 and a["data"] == b["data"] and a["guard"] == b["guard"]
    # the per-block weight files: what init_from and the exports read. Noise: 4 Adam steps from gradients
    # equal to ~1e-7 move weights by ~lr x 1e-6; bug: a block not gathered (empty or another block's
    # tensors) or not updated (lr 1e-3 x 4 steps) is >= 1e-3 off
    want, got = _layer_states(tmp_path / "pipe" / "checkpoints" / "global_step4"), \
        _layer_states(out / "checkpoints" / "global_step4")
    assert want.keys() == got.keys() and len(want) > 50
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert (got[k] - want[k]).abs().max().item() < 1e-5, k
    # lvita convert to-hf reads the ZeRO-3 checkpoint as it reads the pipeline's (same tolerance as above)
    from safetensors.torch import load_file

    from lvita.ckpt.convert import to_hf

    exported = [load_file(next(to_hf(str(run), str(tmp_path / f"hf-{run.name}"), log=lambda *a: None)
                               .glob("*.safetensors"))) for run in (tmp_path / "pipe", out)]
    assert exported[0].keys() == exported[1].keys() and len(exported[0]) > 50
    for k in exported[0]:
        assert (exported[0][k] - exported[1][k]).abs().max().item() < 1e-5, k


def test_zero3_with_the_memory_levers_and_the_sequence_loss_reduction_matches_the_plain_model():
    """ZeRO-3 at data parallel 2 with activation checkpointing and TiledMLP (352 tokens over the LLM's hidden
    160: three shards, recomputed in backward under ZeRO-3's gathering), and with train.loss_reduction
    "sequence" (one scale per row: the head runs per row)."""
    from lvita.data.stream import collate
    from lvita.parallel.pipeline import to_sequential
    from tests.test_pipeline import _sequence_reference

    model = to_sequential("tiny", IMG, SEED)
    loss_sum, n = model(*collate(packed_batch(GLOBAL, 352, seed=3)))
    (loss_sum / n).backward()
    ref_grads = {name: p.grad for name, p in model.named_parameters()}
    _check(run_world(_zero_loss_and_grads, 2, 3, 1, 1, True, "token", True, 352), (loss_sum / n).item(), ref_grads)
    ref_loss, ref_grads = _sequence_reference()
    _check(run_world(_zero_loss_and_grads, 2, 3, 1, 1, True, "sequence"), ref_loss, ref_grads)


def test_zero3_bf16_with_both_offloads_trains_only_the_projector(tmp_path, tokenizer_dir, dataset_dir):
    """The GPU config (ds_configs/zero3_bf16.json) on CPU, one process, stage 1's freezing (projector only),
    train.param_offload and train.optimizer_offload (DeepSpeed's CPU Adam): it trains, and the per-block weight
    files show the projector changed and nothing else did."""
    from lvita.model.presets import llm_config
    from lvita.parallel.pipeline import plain_name, to_sequential

    cfg = stage_dict(tokenizer_dir, dataset_dir, tmp_path / "out", iterations=2)
    cfg.update(precision="bf16", deepspeed=str(REPO / "ds_configs" / "zero3_bf16.json"))
    cfg["model"]["trainable"] = ["projector"]
    cfg["train"].update(lr={"projector": 1e-2}, param_offload=True, optimizer_offload=True)
    losses = run_world(_train, 1, str(write_stage(tmp_path / "s.json", cfg)), [])[0]
    assert len(losses) == 2 and all(x == x for x in losses), losses
    n_layers = llm_config("tiny").num_hidden_layers
    saved = {plain_name(k, n_layers): v for k, v in _layer_states(tmp_path / "out" / "checkpoints" / "global_step2").items()}
    init = to_sequential("tiny", 5, seed=cfg["seed"]).state_dict()
    assert saved.keys() == init.keys()
    # bf16 weights: a frozen weight is its initial value rounded to bf16, exactly; the projector moved by lr 1e-2
    changed = {k for k, v in init.items() if not torch.equal(saved[k], v.to(torch.bfloat16))}
    assert changed == {k for k in init if "multi_modal_projector" in k}, sorted(changed)[:5]
