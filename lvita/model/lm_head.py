"""Chunked LM-head cross-entropy: the training loss with memory bounded by one chunk of logits.

Owns :func:`chunked_cross_entropy_sum`, which :class:`lvita.model.longvita.LMHead` uses for the
loss (``model.logits_chunk`` labelled tokens per chunk), and :func:`full_cross_entropy_sum`, the
plain computation it must equal (logits for every position, then masked cross-entropy), kept for
``model.logits_chunk: 0``, tests and benchmarks.

    loss = chunked_cross_entropy_sum(hidden_rows, lm_head.weight, targets, chunk=8192)

``hidden_rows`` (N, D) are the normed hidden states of the labelled positions only, ``targets``
(N,) their token ids. The autograd function :class:`_ChunkedCrossEntropy`:

- forward, per chunk of rows: logits = rows @ W^T in the hidden dtype, then ``.float()`` (as
  ``lm_head(x).float()``), logsumexp and the target logit; adds ``lse - target`` to the fp32 sum
  and drops the logits. It saves only the rows, W, the targets and the (N,) fp32 logsumexp.
- backward, per chunk: recomputes the logits, dlogits = (softmax - onehot) * grad in fp32, cast
  to the hidden dtype as autograd's ``.float()`` backward does, then d rows = dlogits @ W and
  dW += dlogits^T @ rows. Gradients come back in the dtype of their input.

Peak memory of the loss is one chunk's logits, about chunk x vocab x (4 + hidden dtype size) bytes
(8192 x 151,936 in bf16: 4.6 GiB fp32 + 2.3 GiB bf16), whatever the sequence length, and only
while the loss runs; the full head keeps positions x vocab fp32 logits from forward to backward
and makes their gradient, as large, in backward.

Trade-offs: the head's matmul runs once more (recomputed in backward: 4 matmuls instead of 3,
about +33% of the head's FLOPs) rather than keeping the logits or computing the gradients in
forward (Liger-style, which would hold a weight-sized gradient from forward to backward and
compute it even when no backward follows). With bf16 weights and more than one chunk, dW is
accumulated in an fp32 buffer the size of W (the full head's single matmul accumulates in fp32
too); this is transient, in the head's backward only.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
DEFAULT_LOGITS_CHUNK = 8192  # model.logits_chunk's default (lvita.config.ModelConfig)


def full_cross_entropy_sum(normed: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain head: logits for every position, then cross-entropy summed over labelled ones.

    normed (..., D), weight (V, D), labels (...) -> fp32 scalar. Holds (positions x V) fp32 logits.
    """
    logits = nn.functional.linear(normed, weight).float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int = DEFAULT_LOGITS_CHUNK) -> torch.Tensor:
    """Sum over rows of cross_entropy(rows @ weight^T, targets) with at most ``chunk`` rows of
    logits alive at a time, forward and backward. rows (N, D), weight (V, D), targets (N,)."""
    if chunk < 1:
        raise ValueError(f"logits chunk must be >= 1, got {chunk}")
    if rows.dim() != 2 or targets.shape != rows.shape[:1]:
        raise ValueError(f"rows (N, D) and targets (N,) expected, got {tuple(rows.shape)} and {tuple(targets.shape)}")
    return _ChunkedCrossEntropy.apply(rows, weight, targets, chunk)


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(rows, weight).float()  # same rounding as lm_head(x).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, targets, chunk):
        n = rows.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        lse = torch.empty(n, dtype=torch.float32, device=rows.device)
        for s in range(0, n, chunk):
            logits = _chunk_logits(rows[s:s + chunk], weight)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[s:s + chunk].unsqueeze(1)).squeeze(1)
            total += (lse[s:s + chunk] - target_logit).sum()
            del logits, target_logit
        ctx.save_for_backward(rows, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        rows, weight, targets, lse = ctx.saved_tensors
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk, n = ctx.chunk, rows.shape[0]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = None
        if need_weight:
            acc = torch.float32 if n > chunk else weight.dtype  # several chunks: sum them in fp32
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad = grad.float()
        for s in range(0, n, chunk):
            part = rows[s:s + chunk]
            # softmax - onehot, times the incoming gradient, all in place on the recomputed logits
            dlogits = _chunk_logits(part, weight).sub_(lse[s:s + chunk].unsqueeze(1)).exp_()
            dlogits[torch.arange(part.shape[0], device=part.device), targets[s:s + chunk]] -= 1.0
            dlogits = dlogits.mul_(grad).to(rows.dtype)
            if need_rows:
                torch.mm(dlogits, weight, out=grad_rows[s:s + chunk])
            if need_weight and acc == rows.dtype:
                grad_weight.addmm_(dlogits.t(), part)
            elif need_weight:
                grad_weight += (dlogits.t() @ part).float()
            del dlogits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_rows, grad_weight, None, None
