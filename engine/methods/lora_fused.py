"""A LoRA linear layer as one autograd node.

    x ──┬── W (frozen; dense, or NF4 dequantized on the fly) ──┐
        │                                                       (+)── y = x Wᵀ + b + s·(x Aᵀ) Bᵀ
        └── A (r × in) ── xa (N × r) ── B (out × r) ── · s ────┘

The plain module path (`LoraLinear.forward`) is five to seven autograd nodes per
adapted layer (base linear, dropout, A, scale, B, cast, add) and as many kernel
launches forward and about twice that backward; with seven adapted projections in
each of 30 blocks that is thousands of launches per step, which is what bound the
first GPU step (device README: the GPU was busy 70 ms of a 220 ms step). Here the
forward is three GEMMs (x Wᵀ, x Aᵀ, and xa Bᵀ accumulated into the output by one
`addmm_`), the backward five (the input gradient accumulated the same way), and
autograd sees one node.

Same arithmetic as the module path under autocast: every product runs in the compute
dtype (autocast's, else the input's), the fp32 master A and B are cast to it once per
forward, and their gradients come back in their own dtype. What is saved for backward
is what the module path saves: the layer input and the rank-r product xa (plus the
cast copies of A and B, as autocast keeps them), so the memory estimate is unchanged.
Used where it applies (no dropout, a dense `nn.Linear` or an NF4 base, not merged)
on CUDA by default; `STUDIO_FUSED_LORA=1` forces it on CPU too (tests), `0` never.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685;
Dettmers et al., "QLoRA", arXiv:2305.14314 (the NF4 base).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch


def _mode_from_env() -> str:
    raw = os.environ.get("STUDIO_FUSED_LORA", "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "on", "true", "yes"):
        return "on"
    if raw in ("0", "off", "false", "no"):
        return "off"
    raise ValueError(f"STUDIO_FUSED_LORA={raw!r}: expected auto (CUDA only), 1 (always) or 0 (never)")


_mode = _mode_from_env()


def set_mode(mode: str) -> None:
    """`auto` (CUDA tensors), `on` (every device) or `off`, from now on (tests, benches)."""
    global _mode
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"fused LoRA mode {mode!r}: expected auto, on or off")
    _mode = mode


def enabled_for(x: torch.Tensor) -> bool:
    """Whether x takes the one-node path: by the mode, and never inside a region torch.compile
    traces (engine.compile), where Inductor fuses the plain module path itself."""
    return (_mode == "on" or (_mode == "auto" and x.is_cuda)) and not torch.compiler.is_compiling()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's where it is on for x's device, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ for 2-D x; `weight(dtype)` gives W (out × in) in dtype
    (called again in backward, so a quantized base is never kept dequantized)."""

    @staticmethod
    def forward(ctx, x, A, B, bias, weight: Callable[[torch.dtype], torch.Tensor], scale: float,
                cdt: torch.dtype):
        xc = x if x.dtype == cdt else x.to(cdt)
        a, b = A.to(cdt), B.to(cdt)
        w = weight(cdt)
        xa = xc @ a.t()
        y = xc @ w.t() if bias is None else torch.addmm(bias.to(cdt), xc, w.t())
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(xc, xa, a, b)
        ctx.weight, ctx.scale, ctx.x_dtype, ctx.has_bias = weight, scale, x.dtype, bias is not None
        ctx.dtypes = (A.dtype, B.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, g):
        xc, xa, a, b = ctx.saved_tensors
        g = g if g.dtype == xc.dtype else g.to(xc.dtype)
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        s = ctx.scale
        gxa = (g @ b).mul_(s) if (need_x or need_a) else None      # (N, r)
        gx = ga = gb = gbias = None
        if need_x:
            gx = g @ ctx.weight(xc.dtype)
            gx.addmm_(gxa, a)
            gx = gx.to(ctx.x_dtype)
        if need_a:
            ga = (gxa.t() @ xc).to(ctx.dtypes[0])
        if need_b:
            gb = (g.t() @ xa).mul_(s).to(ctx.dtypes[1])
        if need_bias and ctx.has_bias:
            gbias = g.sum(0).to(ctx.dtypes[2])
        return gx, ga, gb, gbias, None, None, None


def lora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor],
                weight: Callable[[torch.dtype], torch.Tensor], scale: float) -> torch.Tensor:
    """The fused LoRA linear of x (any leading dims); the result is in the compute dtype."""
    cdt = compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y = _LoraLinearFn.apply(x2, A, B, bias, weight, scale, cdt)
    return y.view(*x.shape[:-1], y.shape[-1])
