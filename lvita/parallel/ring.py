"""Zigzag ring attention on torch's own attention kernels (forward and backward, exact), CPU and CUDA.

The sequence is cut into 2 x sp chunks; rank r holds chunks r and 2sp-1-r (zigzag: every rank
gets the same share of causal work). K/V blocks travel round the ring; each block's partial
output is merged by log-sum-exp. Causality between q on rank r and the k/v of rank s:
s == r: causal over the local pair; s < r: every q sees only the first k/v chunk; s > r: only
the second q chunk sees the k/v, fully. Backward runs per block with the final output and
log-sum-exp; dK/dV accumulators travel with their K/V block and take one last hop home.

Shapes: q, k, v (B, S/sp, H, D) zigzag shards (same head count: expand GQA first), out the same;
``group`` is the ring's process group. The block kernels come from lvita.parallel.lse_kernels
(torch's CPU flash op on CPU, torch's CUDA flash or memory-efficient op on GPUs), chosen by q's
device and dtype; partial outputs and log-sum-exps are merged in fp32. This is the ring on CPU
(tests) and on GPUs without a working flash-attn (lvita.parallel.hybrid decides); with flash-attn,
GPUs use yunchang's flash-attn zigzag ring. Over gloo, CUDA blocks travel through host memory.

    out = ring_attention(q, k, v, group, scale)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lvita.parallel import lse_kernels


def zigzag_indices(seq_len: int, degree: int, rank: int) -> torch.Tensor:
    """Token indices of ``rank``'s zigzag shard: chunks rank and 2*degree-1-rank of 2*degree."""
    n = seq_len // (2 * degree)
    a, b = rank * n, (2 * degree - 1 - rank) * n
    return torch.cat([torch.arange(a, a + n), torch.arange(b, b + n)])


def _exchange(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send to the next rank of the ring, receive from the previous one."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt, prv = dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)
    device = tensors[0].device
    if device.type != "cpu" and dist.get_backend(group) == "gloo":  # gloo sends host memory only
        tensors = [t.cpu() for t in tensors]
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in recv]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return [r.to(device) for r in recv]


def _merge(out, lse, block_out, block_lse):
    # out (B, H, s, D) fp32, lse (B, H, s) fp32: the running result; block_* one more K/V block's
    block_out, block_lse = block_out.float(), block_lse.float()
    new = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new).unsqueeze(-1) + block_out * torch.exp(block_lse - new).unsqueeze(-1)
    return out, new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale):
        # q, k, v: (B, H, 2n, D) on every rank of ``group``.
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        kern = lse_kernels.kernel_for(q)
        n = q.shape[2] // 2
        out = torch.zeros_like(q, dtype=torch.float32)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kk, vv = k, v
        for step in range(size):
            if step == 0:
                o, l, state = kern.fwd(q, kk, vv, True, scale)
                out, lse = _merge(out, lse, o, l)
            elif step <= rank:
                o, l, _ = kern.fwd(q, kk[:, :, :n].contiguous(), vv[:, :, :n].contiguous(), False, scale)
                out, lse = _merge(out, lse, o, l)
            else:
                o, l, _ = kern.fwd(q[:, :, n:].contiguous(), kk, vv, False, scale)
                out2, lse2 = _merge(out[:, :, n:], lse[:, :, n:], o, l)
                out, lse = torch.cat([out[:, :, :n], out2], 2), torch.cat([lse[:, :, :n], lse2], 2)
            if step + 1 < size:
                kk, vv = _exchange([kk, vv], group)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)  # lse (B, H, 2n) fp32
        ctx.group, ctx.scale, ctx.kern, ctx.state = group, scale, kern, state
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, kern, state = ctx.group, ctx.scale, ctx.kern, ctx.state
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        n = q.shape[2] // 2
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kk, vv = k, v
        dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        for step in range(size):
            if step == 0:
                gq, gk, gv = kern.bwd(dout, q, kk, vv, out, lse, state, True, scale)
                dq += gq
                dk += gk
                dv += gv
            elif step <= rank:
                k0, v0 = kk[:, :, :n].contiguous(), vv[:, :, :n].contiguous()
                gq, gk, gv = kern.bwd(dout, q, k0, v0, out, lse, state, False, scale)
                dq += gq
                dk[:, :, :n] += gk
                dv[:, :, :n] += gv
            else:
                sl = slice(n, None)
                gq, gk, gv = kern.bwd(dout[:, :, sl].contiguous(), q[:, :, sl].contiguous(), kk, vv,
                                      out[:, :, sl].contiguous(), lse[:, :, sl].contiguous(), state, False, scale)
                dq[:, :, sl] += gq
                dk += gk
                dv += gv
            if step + 1 < size:
                kk, vv, dk, dv = _exchange([kk, vv, dk, dv], group)
        if size > 1:  # the accumulators now belong to the next rank's K/V: one hop home
            dk, dv = _exchange([dk, dv], group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_attention(q, k, v, group, scale: float | None = None) -> torch.Tensor:
    """q, k, v (B, S/sp, H, D) zigzag shards -> (B, S/sp, H, D); causal over the whole sequence."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if k.shape[2] != q.shape[2]:  # GQA: expand KV heads (autograd sums their gradients back)
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return _RingAttention.apply(qh, kh, vh, group, scale).transpose(1, 2)
