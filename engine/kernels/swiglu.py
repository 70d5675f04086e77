"""The SwiGLU product silu(gate) * up (Shazeer 2020, "GLU Variants Improve
Transformer", arXiv:2002.05202; SiLU from Elfwing et al. 2018, arXiv:1702.03118),
one Triton kernel each way:

    forward   h  = g * s * u,                      s = sigmoid(g)
    backward  dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s

Saved for backward: gate and up only (silu is recomputed), and up only when gate
needs a gradient, as the C kernel (engine.fused) saves; autograd's default also
keeps silu(gate), a third tensor of the FFN's width. fp32 arithmetic; the result
has the dtype gate and up promote to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_float, launch

BLOCK = 1024


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, HAS_DG: tl.constexpr, HAS_DU: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    if HAS_DG:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    if HAS_DU:
        tl.store(du_ptr + offs, (dh * g * s).to(du_ptr.dtype.element_ty), mask=mask)


class TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n = gate.numel()
        launch(_swiglu_fwd, (triton.cdiv(n, BLOCK),), gate, gate, up, h, n, BLOCK=BLOCK, num_warps=4)
        need_gate, need_up = ctx.needs_input_grad
        ctx.save_for_backward(gate if (need_gate or need_up) else None, up if need_gate else None)
        ctx.up_dtype = up.dtype
        return h

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        if not (need_gate or need_up):
            return None, None
        grad = grad.contiguous()
        dg = torch.empty_like(gate) if need_gate else None
        du = torch.empty(gate.shape, dtype=ctx.up_dtype, device=gate.device) if need_up else None
        n = gate.numel()
        # an input or output not needed gets a stand-in pointer the kernel never touches
        launch(_swiglu_bwd, (triton.cdiv(n, BLOCK),), gate, grad, gate, up if need_gate else gate,
               dg if need_gate else du, du if need_up else dg, n, HAS_DG=need_gate, HAS_DU=need_up, BLOCK=BLOCK,
               num_warps=4)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape (bf16, fp16 or fp32)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate of shape {tuple(gate.shape)} and up of shape {tuple(up.shape)}")
    check_float("swiglu: gate", gate)
    check_float("swiglu: up", up)
    return TritonSwiGLU.apply(gate, up)
