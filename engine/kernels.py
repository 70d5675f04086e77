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
"""

from __future__ import annotations

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
