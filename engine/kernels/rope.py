"""Rotary position embedding (Su et al. 2021, "RoFormer: Enhanced Transformer with
Rotary Position Embedding", arXiv:2104.09864) in transformers' half-split layout,
one Triton kernel each way, on a projection's output before the head transpose:
x [batch, seq, heads, head_dim], cos and sin [batch or 1, seq, head_dim].

With x = (x1, x2) the two halves of a head:
    forward   out = (x1*c1 - x2*s1, x2*c2 + x1*s2)       (x*cos + rotate_half(x)*sin)
    backward  dx  = (g1*c1 + g2*s2, g2*c2 - g1*s1)       (the transposed rotation)

One program per token rotates all its heads with one read of its cos/sin row.
The arithmetic is fp32; the result has x's dtype, whatever cos/sin's dtype (under
autocast the projections come out bf16 while cos/sin may stay fp32). Nothing is
saved for backward beyond cos and sin, which every layer shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rope_op import check_rope_args, rope_function
from ._launch import check_float, launch


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, dim, cos_rows,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    half = dim // 2
    j = tl.arange(0, BLOCK_D)
    jmask = j < half
    crow = (t % cos_rows) * dim
    c1 = tl.load(cos_ptr + crow + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + crow + half + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + crow + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + crow + half + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_H)
    at = t * heads * dim + h[:, None] * dim + j[None, :]
    mask = (h[:, None] < heads) & jmask[None, :]
    x1 = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + at + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(out_ptr + at, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + at + half, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    tokens, heads, dim = x.shape[0] * x.shape[1], x.shape[2], x.shape[3]
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(dim // 2)
    launch(_rope_kernel, (tokens,), x, x, cos, sin, out, heads, dim, cos.numel() // dim, BACKWARD=backward,
           BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4 if block_h * block_d >= 2048 else 2)
    return out


TritonRoPE = rope_function(_apply, "TritonRoPE")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of x [batch, seq, heads, head_dim] (bf16, fp16 or fp32)
    with cos, sin [batch or 1, seq, head_dim] (any float dtype, no gradient). Returns
    a new contiguous tensor of x's shape and dtype."""
    check_rope_args(x, cos, sin)
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_float(f"rope: {name}", t)
    return TritonRoPE.apply(x.contiguous(), cos.contiguous(), sin.contiguous())
