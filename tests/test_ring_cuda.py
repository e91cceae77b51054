"""lvita's zigzag ring on CUDA (GPUs without flash-attn), checked as far as CPU allows and fully on a GPU.

On CPU (always): every CUDA op call of lvita.parallel.lse_kernels is run against the op's meta
kernel (argument order, arity, dtypes, block shapes of the ring, the memory-efficient LSE
padding); and the whole ring runs through yunchang (2 ranks, gloo) with the CUDA ops emulated:
each call first goes to the real op on meta copies of its arguments (so a signature mistake
raises), then is computed with torch's CPU flash op and returned in the CUDA op's output form
(flash: 9 outputs, out laid out (B, S, H, D); efficient: LSE padded with garbage). Output and
q/k/v gradients equal full causal attention (fp32, 1e-5).
On CUDA (skipped without): each kernel against SDPA, and the ring through yunchang (2 processes:
nccl with 2 GPUs, else gloo on one GPU) against full attention (bf16 tolerance), with flash-attn
treated as absent."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_world

B, S, HQ, HKV, D = 2, 32, 4, 2, 8
# bf16 on GPU: noise ~1-2 bf16 ulps (3.9e-3 each) of values ~1 between kernels' accumulation orders; fp32
# (efficient kernel, TF32 off) ~1e-5, so 2e-4; bug: a wrong mask, scale or LSE merge, ~1e-1
BF16 = dict(rtol=2e-2, atol=2e-2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(dtype=torch.float32, device="cpu", s=S, d=D):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, s, h, d, generator=g) for h in (HQ, HKV, HKV))
    dout = torch.randn(B, s, HQ, d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def _reference(q, k, v, dout):
    """Full causal attention in fp32 -> out, dq, dk, dv (B, S, H, D) fp32."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    kr, vr = k.repeat_interleave(HQ // HKV, 2), v.repeat_interleave(HQ // HKV, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                         is_causal=True).transpose(1, 2)
    out.backward(dout.float())
    return out.detach(), q.grad, k.grad, v.grad


# -- on CPU: the CUDA calls against the ops' meta kernels -------------------------------------------

@pytest.mark.parametrize("name", ["cuda-flash", "cuda-efficient"])
@pytest.mark.parametrize("sq,sk,causal", [(100, 100, True), (100, 50, False), (50, 100, False)])
def test_cuda_kernel_calls_fit_the_ops_meta_kernels(name, sq, sk, causal):
    """The ring's three block shapes (diagonal causal, first K/V chunk, second q chunk)."""
    from lvita.parallel import lse_kernels

    kern = {k.name: k for k in (lse_kernels.CUDA_FLASH, lse_kernels.CUDA_EFFICIENT)}[name]
    q = torch.empty(2, 4, sq, 64, device="meta", dtype=torch.bfloat16)
    k, v = (torch.empty(2, 4, sk, 64, device="meta", dtype=torch.bfloat16) for _ in range(2))
    out, lse, state = kern.fwd(q, k, v, causal, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, sq) and lse.dtype == torch.float32
    grads = kern.bwd(out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), state, causal, 0.125)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    if name == "cuda-efficient":  # the padded LSE handed back has the forward's own row count
        raw = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[1]
        assert raw.shape[-1] == lse_kernels._lse_rows(sq) and (sq % 32 == 0 or raw.shape[-1] > sq)


def test_kernel_choice_by_device_dtype_and_gpu():
    from lvita.parallel.lse_kernels import CPU, flash_fits, kernel_for

    assert kernel_for(torch.empty(1, 1, 1, 8)) is CPU
    assert flash_fits(torch.bfloat16, 128, (9, 0)) and flash_fits(torch.float16, 64, (8, 0))
    assert not flash_fits(torch.float32, 128, (9, 0))  # fp32: memory-efficient kernel
    assert not flash_fits(torch.bfloat16, 128, (7, 5)) and not flash_fits(torch.bfloat16, 512, (9, 0))


def test_hybrid_uses_lvita_ring_on_gpus_unless_flash_attn_imports(monkeypatch):
    """yunchang's own fallback (TORCH_FLASH) has no backward: never chosen; a flash-attn that fails
    to import (absent, wrong ABI) means lvita's ring, registered in yunchang's kernel table."""
    import sys
    import types

    import yunchang.globals
    from yunchang.hybrid.utils import RING_IMPL_DICT
    from yunchang.kernels import AttnType

    from lvita.parallel import hybrid

    assert RING_IMPL_DICT[hybrid.LVITA_KERNEL] is hybrid._lvita_zigzag_ring
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", None)
    impl, attn_type, note = hybrid._kernel()
    assert (impl, attn_type) == (hybrid.LVITA_KERNEL, None) and "CUDA flash/memory-efficient" in note
    broken = types.ModuleType("flash_attn.flash_attn_interface")
    broken.__getattr__ = lambda name: (_ for _ in ()).throw(OSError("undefined symbol: _ZN3c10"))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", broken)
    assert hybrid._kernel()[0] == hybrid.LVITA_KERNEL and "undefined symbol" in hybrid._kernel()[2]
    good = types.ModuleType("flash_attn.flash_attn_interface")
    good._flash_attn_forward = good._flash_attn_backward = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", good)
    monkeypatch.setattr(yunchang.globals, "HAS_FLASH_ATTN", True)
    assert hybrid._kernel()[:2] == ("zigzag", AttnType.FA)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hybrid._kernel()[:2] == (hybrid.LVITA_KERNEL, None)


class _EmulatedCudaOps:
    """torch.ops.aten for lse_kernels: CUDA ops checked on meta, computed on CPU, CUDA-shaped outputs."""

    def __init__(self):
        self.calls = []
        self._cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        self._cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def __getattr__(self, name):
        real = getattr(torch.ops.aten, name)

        def call(*args, **kwargs):
            meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
            real(*map(meta, args), **{k: meta(x) for k, x in kwargs.items()})  # schema + shapes
            self.calls.append(name)
            return getattr(self, "emulate" + name)(*args, **kwargs)
        return call

    def emulate_scaled_dot_product_flash_attention(self, q, k, v, dropout, causal, debug, *, scale):
        out, lse = self._cpu_fwd(q, k, v, dropout, causal, scale=scale)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) over (B, S, H, D) memory
        rng, unused = torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64)
        return out, lse, None, None, q.shape[2], k.shape[2], rng, unused, torch.empty(0)

    def emulate_scaled_dot_product_flash_attention_backward(self, dout, q, k, v, out, lse, cq, ck, mq, mk, dropout,
                                                      causal, seed, offset, *, scale):
        assert (mq, mk) == (q.shape[2], k.shape[2]) and lse.shape == q.shape[:3] and seed.dtype == torch.uint64
        return self._cpu_bwd(dout, q, k, v, out, lse, dropout, causal, scale=scale)

    def emulate_scaled_dot_product_efficient_attention(self, q, k, v, bias, want_lse, dropout, causal, *, scale):
        out, lse = self._cpu_fwd(q, k, v, dropout, causal, scale=scale)
        rows = -(-q.shape[2] // 32) * 32
        padded = torch.full((*lse.shape[:2], rows), float("inf"))  # garbage past S_q, as on CUDA
        padded[..., : q.shape[2]] = lse
        return out, padded, torch.tensor(0), torch.tensor(0)

    def emulate_scaled_dot_product_efficient_attention_backward(self, dout, q, k, v, bias, out, lse, seed, offset, dropout,
                                                         mask, causal, *, scale):
        assert lse.shape[-1] == -(-q.shape[2] // 32) * 32 and list(mask) == [True, True, True, False]
        dq, dk, dv = self._cpu_bwd(dout, q, k, v, out, lse[..., : q.shape[2]].contiguous(), dropout, causal,
                                   scale=scale)
        return dq, dk, dv, None


def _ring_with_emulated_cuda_ops(rank):
    from lvita.parallel import hybrid, lse_kernels
    from lvita.parallel.sequence import shard_indices
    from lvita.parallel.topology import build_topology, init_distributed

    init_distributed()
    topo = build_topology(1, 1, 2)
    emulated = _EmulatedCudaOps()
    lse_kernels.aten = emulated
    results = {}
    for kern in (lse_kernels.CUDA_FLASH, lse_kernels.CUDA_EFFICIENT):
        lse_kernels.kernel_for = lambda q, kern=kern: kern
        attn = hybrid.HybridAttention(topo.ulysses_group, topo.ring_group, 1)
        assert attn.kernel.startswith("lvita zigzag ring")  # no CUDA here: lvita's ring
        idx = shard_indices(S, rank, 1, 2)
        q, k, v, dout = (t[:, idx].clone().requires_grad_(i < 3) for i, t in enumerate(_inputs()))
        out = attn(q, k, v)
        out.backward(dout)
        results[kern.name] = (idx, out.detach(), q.grad, k.grad, v.grad)
    return results, sorted(set(emulated.calls))


def test_ring_through_yunchang_with_emulated_cuda_ops():
    ref = _reference(*_inputs())
    for results, calls in run_world(_ring_with_emulated_cuda_ops, 2):
        assert calls == ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                         "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"]
        for name, (idx, *got) in results.items():
            for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
                # fp32 on CPU through the emulated ops: noise ~1e-7, bug ~1e-1 (as test_ring.py)
                torch.testing.assert_close(g, r[:, idx], rtol=1e-5, atol=1e-5, msg=f"{name} {what}")


# -- on a GPU -----------------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sq,sk,causal", [(64, 64, True), (64, 32, False), (32, 64, False), (40, 40, True)])
def test_cuda_kernels_match_sdpa(dtype, sq, sk, causal):
    from lvita.parallel import lse_kernels

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, sq, 64, generator=g).to("cuda", dtype)
    k, v = (torch.randn(2, 4, sk, 64, generator=g).to("cuda", dtype) for _ in range(2))
    dout = torch.randn(2, 4, sq, 64, generator=g).to("cuda", dtype)
    kernels = [lse_kernels.CUDA_EFFICIENT] + ([lse_kernels.CUDA_FLASH] if dtype == torch.bfloat16 else [])
    assert lse_kernels.kernel_for(q) in kernels
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
    ref.backward(dout.float())
    ref_lse = torch.logsumexp((qf @ kf.transpose(-1, -2) / 8).masked_fill(
        torch.ones(sq, sk, dtype=torch.bool, device="cuda").triu(1) if causal else
        torch.zeros(sq, sk, dtype=torch.bool, device="cuda"), float("-inf")), -1)
    tol = BF16 if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-4)
    for kern in kernels:
        out, lse, state = kern.fwd(q, k, v, causal, 0.125)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, sq)
        torch.testing.assert_close(out.float(), ref.detach(), **tol)
        torch.testing.assert_close(lse, ref_lse.detach(), **tol)
        dq, dk, dv = kern.bwd(dout, q, k, v, out.contiguous(), lse.contiguous(), state, causal, 0.125)
        for got, want in zip((dq, dk, dv), (qf.grad, kf.grad, vf.grad)):
            torch.testing.assert_close(got.float(), want, **tol)


def _ring_on_cuda(rank, dtype):
    import torch.distributed as dist

    from lvita.parallel import hybrid
    from lvita.parallel.sequence import shard_indices
    from lvita.parallel.topology import build_topology

    two = torch.cuda.device_count() >= 2
    device = f"cuda:{rank if two else 0}"
    torch.cuda.set_device(device)
    dist.init_process_group("nccl" if two else "gloo")  # gloo: the ring stages blocks through host memory
    topo = build_topology(1, 1, 2)
    hybrid.flash_attn_error = lambda: "treated as absent by the test"
    attn = hybrid.HybridAttention(topo.ulysses_group, topo.ring_group, 1)
    idx = shard_indices(256, rank, 1, 2)
    q, k, v, dout = (t[:, idx].clone().requires_grad_(i < 3)
                     for i, t in enumerate(_inputs(dtype, device, s=256, d=64)))
    out = attn(q, k, v)
    out.backward(dout)
    return attn.kernel, idx, *(t.detach().float().cpu() for t in (out, q.grad, k.grad, v.grad))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ring_through_yunchang_on_cuda_without_flash_attn(dtype):
    ref = _reference(*_inputs(dtype, s=256, d=64))
    tol = BF16 if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-4)
    for kernel, idx, *got in run_world(_ring_on_cuda, 2, dtype):
        assert "lvita zigzag ring on torch's CUDA" in kernel
        for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(g, r[:, idx], **tol, msg=what)
