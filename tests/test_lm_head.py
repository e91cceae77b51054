"""The chunked LM-head loss (``model.logits_chunk``): the same loss and gradients as the full head
(logits for every position, then masked cross-entropy) within fp32 tolerance, on the head alone,
through the whole tiny model and under DeepSpeed's pipeline engine; and memory that never holds
(labelled tokens x vocabulary) logits, checked with saved-tensor hooks and on every op's output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lvita.data.stream import collate
from lvita.model.lm_head import DEFAULT_LOGITS_CHUNK, chunked_cross_entropy_sum, full_cross_entropy_sum
from lvita.model.longvita import LMHead, LongVita
from tests.synthetic import IMG, packed_batch
from tests.tolerances import assert_near, within

# fp32: loss relative to itself, each gradient relative to its largest entry. Noise: the same sums split
# into chunks, eps x sqrt(terms) ~ 1e-6 (ratios logged: tests/README.md); bug: a chunk's tokens dropped or
# counted twice moves the loss and gradients by their share of the labelled tokens (>= 1/1000 here, the
# smallest chunked share of test_chunked_loss...'s ~1400 labelled tokens), a logit column shifted ~1
RTOL = 1e-5
B, S, D, V = 2, 1024, 16, 2048


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    assert got.dtype == ref.dtype, (what, got.dtype, ref.dtype)
    assert_near(got, ref, rtol, what)


def _inputs(seed: int = 0, labelled: float = 0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    normed = torch.randn(B, S, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) >= labelled] = -100
    return normed, weight, labels


def _loss_and_grads(normed, weight, labels, chunk):
    """chunk 0: the full head; else the chunked loss on the labelled rows, as LMHead does."""
    h, w = normed.clone().requires_grad_(), weight.clone().requires_grad_()
    if chunk == 0:
        loss = full_cross_entropy_sum(h, w, labels)
    else:
        keep = labels != -100
        loss = chunked_cross_entropy_sum(h[keep], w, labels[keep], chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, DEFAULT_LOGITS_CHUNK])
def test_chunked_loss_and_gradients_equal_the_full_head(chunk):
    normed, weight, labels = _inputs()
    n = int((labels != -100).sum())
    assert n % 7 and n % 64 and n % 1000 and n < DEFAULT_LOGITS_CHUNK  # uneven last chunks, one chunk
    ref_loss, ref_h, ref_w = _loss_and_grads(normed, weight, labels, 0)
    loss, grad_h, grad_w = _loss_and_grads(normed, weight, labels, chunk)
    assert loss.dtype == torch.float32 and within(abs(loss - ref_loss), RTOL * abs(ref_loss))
    _close(grad_h, ref_h, what="d normed")
    _close(grad_w, ref_w, what="d lm_head.weight")


def test_bf16_gradients_come_back_in_bf16_and_match():
    normed, weight, labels = _inputs(seed=1, dtype=torch.bfloat16)
    ref_loss, ref_h, ref_w = _loss_and_grads(normed, weight, labels, 0)
    # noise: fp32 accumulation of dW over chunks vs one bf16 matmul: 4.35e-3 of the largest entry measured
    # (1.1 bf16 ulps, the same at 1-2 threads and AVX2); bug: a dropped chunk (>= 1e-3 of the fp32 loss,
    # checked at 1e-5) or gradients unscaled or doubled (>= 1x): 2e-2 is 4.6x over the noise
    for chunk in (1, 100):
        loss, grad_h, grad_w = _loss_and_grads(normed, weight, labels, chunk)
        assert loss.dtype == torch.float32 and within(abs(loss - ref_loss), 1e-5 * abs(ref_loss))
        _close(grad_h, ref_h, rtol=2e-2, what="d normed (bf16)")
        _close(grad_w, ref_w, rtol=2e-2, what="d lm_head.weight (bf16)")


@pytest.mark.parametrize("chunk", [0, 5])
def test_no_labelled_tokens_gives_zero_loss_and_zero_gradients(chunk):
    head = LMHead("tiny", logits_chunk=chunk)
    hidden = torch.randn(1, 12, head.norm.weight.shape[0], requires_grad=True)
    loss, count = head.loss_sum(head(hidden), torch.full((1, 12), -100))
    loss.backward()
    assert loss.item() == 0.0 and int(count) == 0 and loss.dtype == torch.float32
    for grad in (hidden.grad, head.lm_head.weight.grad, head.norm.weight.grad):
        assert grad is not None and not grad.any()


@pytest.mark.parametrize("chunk", [1, 13, DEFAULT_LOGITS_CHUNK])
def test_whole_model_gradients_equal_the_full_head(chunk):
    ids, pos, pix, tgt = collate(packed_batch(2, 96, seed=2))
    results = []
    for c in (0, chunk):
        model = LongVita("tiny", IMG, seed=5, logits_chunk=c)
        loss, n = model(ids, pos, pix, tgt)
        (loss / n).backward()
        results.append((loss.item(), int(n), {k: p.grad for k, p in model.named_parameters()}))
    (ref_loss, ref_n, ref), (got_loss, got_n, got) = results
    assert got_n == ref_n > 0 and within(abs(got_loss - ref_loss), RTOL * abs(ref_loss))
    assert set(got) == set(ref) and all(g is not None for g in ref.values())
    for name in ref:
        _close(got[name], ref[name], what=name)


def _saved_tensors(fn) -> list[torch.Tensor]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


class _LargestOutputs(TorchDispatchMode):
    """Records the shape of every tensor any op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_chunked_loss_never_holds_labelled_times_vocab_logits():
    chunk = 64
    normed, weight, labels = _inputs(seed=3)
    n = int((labels != -100).sum())
    assert n * V > 8 * max(chunk * V, V * D)  # the sizes tell the cases apart

    def run(c):
        head = LMHead("tiny", logits_chunk=c)
        head.lm_head.weight = torch.nn.Parameter(weight.clone())
        h = normed.clone().requires_grad_()
        saved, ops = [], _LargestOutputs()
        with ops:
            saved = _saved_tensors(lambda: head.loss_sum(h, labels)[0].backward())
        return head.lm_head.weight, saved, [s for s in ops.shapes if s != (V, D)]  # (V, D): dW

    # Saved for backward: the chunked loss keeps the labelled rows, the weight, targets and one
    # logsumexp per row (no vocab-sized dimension but the weight's); the full head keeps fp32 logits.
    w, saved, shapes = run(chunk)
    activations = [t for t in saved if t.data_ptr() != w.data_ptr()]
    assert all(V not in t.shape for t in activations), [tuple(t.shape) for t in activations]
    assert sum(t.numel() * t.element_size() for t in activations) < n * V * 4 / 100
    # Every tensor any op creates, forward and backward: at most one chunk of logits.
    assert max(torch.Size(s).numel() for s in shapes) <= chunk * V
    w, saved, shapes = run(0)
    assert max(t.numel() for t in saved if t.data_ptr() != w.data_ptr()) >= n * V
    assert max(torch.Size(s).numel() for s in shapes) >= n * V  # the check can fail


def test_logits_chunk_key_default_stage_files_and_validation():
    from lvita.config.schema import ConfigError, ModelConfig, StageConfig
    from lvita.config.validate import validate

    assert ModelConfig().logits_chunk == DEFAULT_LOGITS_CHUNK == 8192
    for path in sorted((Path(__file__).resolve().parents[1] / "stages").glob("*/*.json")):
        assert json.loads(path.read_text())["model"]["logits_chunk"] == 8192, path
    with pytest.raises(ConfigError, match=r"model\.logits_chunk=-1: labelled tokens per chunk"):
        validate(StageConfig(model=ModelConfig(logits_chunk=-1)), 1)
    with pytest.raises(ValueError, match="logits_chunk=-1"):
        LMHead("tiny", logits_chunk=-1)


def _pipeline_grads(rank, chunk):
    import deepspeed

    from lvita.data.stream import rank_micro_batches
    from lvita.model.presets import llm_config
    from lvita.parallel.pipeline import build_pipeline, plain_name
    from lvita.parallel.topology import init_distributed
    from tests.test_pipeline import GradCapture

    init_distributed()
    module = build_pipeline("tiny", IMG, 7, 2, logits_chunk=chunk)
    opt = GradCapture(module.parameters())
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
    loss = engine.train_batch(iter(rank_micro_batches(packed_batch(2, 96, seed=3), 0, 1, 1)))
    n_layers = llm_config("tiny").num_hidden_layers
    return float(loss), {plain_name(k, n_layers): opt.grads[id(p)] for k, p in module.named_parameters()
                         if id(p) in opt.grads}


def test_pipeline_engine_with_small_chunks_matches_the_full_head():
    """DeepSpeed pipeline 2, two micro-batches, 5 labelled tokens per chunk vs the plain full head."""
    from tests.distributed import run_world
    from tests.test_pipeline import _check

    model = LongVita("tiny", IMG, seed=7, logits_chunk=0)
    ids, pos, pix, tgt = collate(packed_batch(2, 96, seed=3))
    loss, n = model(ids, pos, pix, tgt)
    (loss / n).backward()
    ref = {k: p.grad for k, p in model.named_parameters()}
    _check(run_world(_pipeline_grads, 2, 5), (loss / n).item(), ref)
