"""Softmax cross-entropy of a chunk of logits, the gradient written in place: the
contract of engine.fused.softmax_xent_ for CUDA tensors of any float dtype.

For each row x with target y:   loss = logsumexp(x) - x[y]
and, when a gradient is wanted, x is overwritten by (softmax(x) - onehot(y)) * scale,
the gradient of scale * sum(loss). One program per row sweeps it twice: first the
running maximum and the rescaled sum of exponentials (the online softmax of
Milakov & Gimelshein 2018, "Online normalizer calculation for softmax",
arXiv:1805.02867), then the gradient. A vocabulary of any size goes through in
blocks, so no row has to fit in registers. fp32 arithmetic; the loss is fp32.

Targets are not checked against the vocabulary on the host (that would wait for
the GPU once per chunk): a target outside [0, vocab) gives that row a NaN loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import XENT_BLOCK, check_contiguous, check_float, launch


@triton.jit
def _xent_kernel(logits_ptr, target_ptr, loss_ptr, vocab, scale, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * vocab
    y = tl.load(target_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    valid = (y >= 0) & (y < vocab)
    picked = tl.load(base + y, mask=valid, other=0.0).to(tl.float32)
    loss = m + tl.log(s) - picked
    tl.store(loss_ptr + row, tl.where(valid, loss, float("nan")))
    if GRAD:
        k = scale / s
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            mask = offs < vocab
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - m) * k
            p = tl.where(offs == y, p - scale, p)
            tl.store(base + offs, p.to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_xent_(logits: torch.Tensor, target: torch.Tensor, scale: float, grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (fp32) of a contiguous [rows, vocab] tensor of logits
    (bf16, fp16 or fp32); with `grad`, `logits` is overwritten by
    (softmax - onehot(target)) * scale in its own dtype. Targets on the CPU are
    checked to lie in [0, vocab); on the GPU a target outside gives a NaN loss."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"softmax_xent_: logits {tuple(logits.shape)} and targets {tuple(target.shape)}")
    check_float("softmax_xent_: logits", logits)
    check_contiguous("softmax_xent_: logits", logits)
    if target.device != logits.device:
        raise ValueError(f"softmax_xent_: targets on {target.device}, logits on {logits.device}")
    target = target.to(torch.int64).contiguous()
    if target.device.type == "cpu" and target.numel() and (int(target.min()) < 0
                                                          or int(target.max()) >= logits.shape[1]):
        raise ValueError(f"softmax_xent_: a target lies outside [0, {logits.shape[1]})")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(XENT_BLOCK, triton.next_power_of_2(vocab))
    launch(_xent_kernel, (rows,), logits, logits, target, loss, vocab, float(scale), GRAD=bool(grad), BLOCK=block,
           num_warps=8 if block >= 2048 else 4)
    return loss
