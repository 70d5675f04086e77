"""The rotary position embedding as one autograd operation, shared by its two kernels
(engine.fused's C loop on CPU, engine.kernels.rope's Triton kernel on CUDA).

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv:2104.09864, in transformers' half-split layout: x [batch, seq, heads, head_dim],
cos and sin [batch or 1, seq, head_dim]. A kernel is `kernel(x, cos, sin, backward)`:
the rotation forward, its transpose backward (the rotation is orthogonal, so the
gradient of x is the transposed rotation of the output's gradient). Only cos and sin
are saved for backward, as autograd does for transformers' x*cos + rotate_half(x)*sin;
every layer shares them.
"""

from __future__ import annotations

from typing import Callable

import torch

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def check_rope_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Refuse shapes a rope kernel cannot take, naming them."""
    if x.dim() != 4 or cos.dim() != 3 or cos.shape[-1] != x.shape[-1] or x.shape[-1] % 2:
        raise ValueError(f"rope: inputs of shape {tuple(x.shape)} with cos of shape {tuple(cos.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos and sin must not require a gradient")
    if cos.shape[0] not in (1, x.shape[0]) or cos.shape[1:] != (x.shape[1], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"rope: cos/sin of shape {tuple(cos.shape)} for inputs of shape {tuple(x.shape)}")


def rope_function(kernel: Kernel, name: str) -> type[torch.autograd.Function]:
    """An autograd Function called `name` (its graph nodes are `<name>Backward`)
    applying `kernel` forward and its transpose backward."""

    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return kernel(x, cos, sin, False)

    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return kernel(grad.contiguous(), cos, sin, True), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})
