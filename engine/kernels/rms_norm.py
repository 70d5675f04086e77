"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization",
arXiv:1910.07467) as Llama computes it, in one Triton kernel each way:

    rstd = 1 / sqrt(mean(x^2) + eps)            (fp32, per row)
    y    = w * (x * rstd).to(x.dtype)            (in the dtype w * x promotes to)

The normalized input is rounded to the input's dtype before the weight multiplies
it, as transformers' LlamaRMSNorm does, so bf16 runs see the same values. Backward:

    dx = rstd * (g*w) - x * rstd^3 * mean(g*w*x)
    dw = sum over rows of g * (x * rstd)         (only when the weight trains)

Saved for backward: the input itself and one fp32 rstd per row, as the C kernel
(engine.fused) saves. The weight gradient is summed by the kernel in fp32: each of a
few programs per multiprocessor accumulates its rows into one partial row, and the
partial rows are added at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_float, launch, programs_for, row_block, warps_for


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * cols + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / cols + eps)
    tl.store(rstd_ptr + row, r)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xn = (xf * r).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * cols + offs, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, cols,
                  HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, BLOCK: tl.constexpr):
    # grid-stride over rows: program p takes rows p, p + P, p + 2P, ...
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, rows, step):
        base = tl.cast(row, tl.int64) * cols
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + row)
        if HAS_DX:
            gw = g * w
            c = tl.sum(gw * x, axis=0) * (r * r * r) / cols
            tl.store(dx_ptr + base + offs, (r * gw - x * c).to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += g * (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * cols + offs, dw, mask=mask)


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        w = weight.contiguous()
        cols = x.shape[-1]
        rows = x.numel() // cols
        block = row_block(cols, "rms_norm")
        y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
        rstd = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
        launch(_rms_norm_fwd, (rows,), x, x, w, y, rstd, cols, float(eps), BLOCK=block, num_warps=warps_for(block))
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_w):
            return None, None, None
        grad = grad.contiguous()
        cols = x.shape[-1]
        rows = x.numel() // cols
        block = row_block(cols, "rms_norm")
        programs = min(rows, programs_for(x.device)) if need_w else rows
        dx = torch.empty_like(x) if need_x else None
        partial = torch.empty(programs, cols, dtype=torch.float32, device=x.device) if need_w else None
        # an output not asked for gets a stand-in pointer the kernel never writes through
        launch(_rms_norm_bwd, (programs,), x, grad, x, w, rstd, dx if need_x else x, partial if need_w else rstd,
               rows, cols, HAS_DX=need_x, HAS_DW=need_w, BLOCK=block, num_warps=warps_for(block))
        dw = partial.sum(0).to(w.dtype) if need_w else None
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, as Llama's RMSNorm
    computes it; x and weight bf16, fp16 or fp32 (they may differ: the result has the
    promoted dtype). A weight that requires grad gets its gradient."""
    if weight.dim() != 1 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for inputs of width {x.shape[-1]}")
    check_float("rms_norm: x", x)
    check_float("rms_norm: weight", weight)
    return TritonRMSNorm.apply(x, weight, eps)
