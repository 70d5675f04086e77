"""Leaner building blocks the engine swaps into a loaded model before a method is
applied. Same math, same parameter names (so adapters, exports and peft interop
are untouched), fewer bytes saved for backward.

- `SwiGLUMLP`: the gated feed-forward of Llama-style models (SwiGLU, Shazeer 2020,
  "GLU Variants Improve Transformer", arXiv:2002.05202), down(silu(gate(x)) * up(x)).
  Autograd's default keeps gate(x), silu(gate(x)) and up(x) for backward: three
  tensors of the FFN's width per token, the largest activation of the block. The
  fused product keeps gate(x) and up(x) only and recomputes silu in backward (one
  cheap elementwise pass), a third less FFN memory — the idea behind Liger
  Kernel's and Unsloth's fused SwiGLU, written here with plain torch ops.
- `FastLinear`: nn.Linear whose fp32 CPU matmuls (forward, and the input gradient
  in backward) run on oneDNN's matmul primitive instead of the BLAS sgemm that
  `F.linear` calls. Same fp32 arithmetic (no bf16/TF32 down-conversion; results
  differ only by summation order, ~1e-6 relative), 15-40% faster on the AVX-512
  CPUs we measured (bench/engine_vs_peft.py), the same saved tensors. Everything
  else (CUDA, bf16, autocast, float64, builds without oneDNN) takes `F.linear`.
  `STUDIO_ONEDNN_LINEAR=0` turns it off.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _SwiGLUProduct(torch.autograd.Function):
    """silu(gate) * up, saving the inputs only (and `up` only when gate needs a gradient)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate_grad, up_grad = ctx.needs_input_grad
        ctx.save_for_backward(gate if (gate_grad or up_grad) else None, up if gate_grad else None)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        gate_grad, up_grad = ctx.needs_input_grad
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if gate_grad else None
        d_up = grad * F.silu(gate) if up_grad else None
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUProduct.apply(gate, up)
    return F.silu(gate) * up


class SwiGLUMLP(nn.Module):
    """A Llama-style MLP (gate_proj, up_proj, down_proj, SiLU) with the fused product.
    Holds the original projection modules, so their names and weights are unchanged."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Replace every Llama-style SiLU-gated MLP of `model` by a `SwiGLUMLP`; returns
    how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if name and is_swiglu_mlp(m)]
    for name, mlp in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SwiGLUMLP(mlp))
    return len(targets)


def _find_onednn_linear():
    """torch's oneDNN linear op (the one Inductor uses on CPU), or None."""
    if os.environ.get("STUDIO_ONEDNN_LINEAR", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a = torch.ones(2, 3)
        if not torch.equal(op(a, torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


_ONEDNN = _find_onednn_linear()


def onednn_enabled() -> bool:
    return _ONEDNN is not None


def set_onednn_enabled(enabled: bool) -> None:
    """Switch the oneDNN path on or off at run time (benchmarks, tests)."""
    global _ONEDNN
    _ONEDNN = _find_onednn_linear() if enabled else None


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ONEDNN is not None and x.device.type == "cpu" and x.dtype is torch.float32
            and weight.dtype is torch.float32 and x.numel() > 0 and not torch.is_autocast_enabled("cpu"))


def _onednn_2d(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ w.T (+ bias) for a 2-D `a` on oneDNN."""
    return _ONEDNN(a, w, bias, "none", [], "")


def matmul_t(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T for 2-D tensors, without autograd (oneDNN when it applies)."""
    return _onednn_2d(a, w) if _takes_onednn(a, w) else a @ w.t()


def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w for 2-D tensors, without autograd (oneDNN when it applies)."""
    return _onednn_2d(a, w.t()) if _takes_onednn(a, w) else a @ w


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b. Saves W for the input gradient, and x only when W trains (what
    autograd saves for F.linear). The weight gradient stays on BLAS: it measured no
    faster on oneDNN."""

    @staticmethod
    def forward(ctx, x2, weight, bias):
        # 2-D in and out: a view made here could not be added to in place afterwards
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        return _onednn_2d(x2, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = _onednn_2d(grad, weight.t()) if need_x else None
        dw = grad.t() @ x2 if need_w else None
        db = grad.sum(0) if need_b else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, on oneDNN for fp32 CPU tensors."""
    if not _takes_onednn(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _OneDNNLinear.apply(x2, weight, bias)
    else:
        y = _onednn_2d(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class FastLinear(nn.Linear):
    """nn.Linear computed by `linear`: same parameters, names and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def output_is_unsaved(layer: nn.Module) -> bool:
    """True for layers whose output no backward needs, so it may be changed in place."""
    return type(layer) in (nn.Linear, FastLinear)


def use_fast_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a FastLinear (a class change: the module,
    its parameters and its place in the model stay); returns how many changed."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = FastLinear
            n += 1
    return n
