"""Layer swaps the engine makes in a loaded model, around applying a method: the
same math and the same parameter names (so adapters, exports and peft interop
are untouched), computed by the engine's kernels (engine.fused, engine.gemm) and
keeping fewer bytes for backward.

- `fuse_swiglu_mlps`: Llama-style gated MLPs, down(silu(gate(x)) * up(x)) (SwiGLU,
  Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202), become a
  `SwiGLUMLP` whose product keeps gate(x) and up(x) for backward, not also
  silu(gate(x)) as autograd does: one FFN-wide tensor per token fewer, the
  largest activation of the block (the idea behind Liger Kernel's and Unsloth's
  fused SwiGLU).
- `use_fused_layers`: Llama's RMSNorm and the rotary embedding in its attention
  take the Triton kernels (engine.kernels) for CUDA tensors of any float dtype, and
  the fused C kernels (engine.fused) while training on fp32 CPU (a frozen norm
  weight only); a class change to a same-named subclass, the module and its state stay.
- `use_fast_linears`: plain nn.Linear layers become `FastLinear`, whose fp32 CPU
  GEMMs run on the backend engine.gemm chose for their shape.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused, gemm, kernels


class SwiGLUMLP(nn.Module):
    """A Llama-style MLP (gate_proj, up_proj, down_proj, SiLU) with the fused product.
    Holds the original projection modules, so their names and weights are unchanged."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if kernels.applies(gate, up):                 # CUDA: the Triton kernel
            return self.down_proj(kernels.ops().swiglu(gate, up))
        return self.down_proj(fused.swiglu(gate, up))


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


# RMSNorm classes whose forward is exactly transformers' LlamaRMSNorm: fp32 statistics,
# weight * normalized input, epsilon in `variance_epsilon`
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_FUSED_CLASSES: dict[type, type] = {}


def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # CUDA: the Triton kernel, which also gives a training weight (ln_tuning, full) its gradient
    if kernels.applies(hidden_states, self.weight):
        return kernels.ops().rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
    # fp32 CPU: a training weight keeps the model's own ops there (what they save is
    # what the memory estimator counts for that case)
    if not self.weight.requires_grad and fused.applies(hidden_states):
        return fused.rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
    return super(type(self), self).forward(hidden_states)


def _fused_rope_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                                  past_key_values=None, **kwargs):
    """transformers' LlamaAttention.forward (5.x) step for step, with the rotary
    embedding of q and k in one fused pass each: engine.kernels.rope (Triton) for
    CUDA tensors of any float dtype (under autocast q and k come out bf16 while cos
    and sin may be fp32: the kernel computes in fp32 and answers in q's dtype),
    engine.fused.rope (C) on fp32 CPU. Used while training; anything else goes to
    the original forward."""
    from transformers.models.llama import modeling_llama as hf

    cos, sin = position_embeddings if position_embeddings is not None else (None, None)
    training = torch.is_grad_enabled() and cos is not None
    if training and kernels.applies(hidden_states, cos, sin):
        rope = kernels.ops().rope
    elif training and cos.dtype is torch.float32 and fused.applies(hidden_states):
        rope = fused.rope
    else:
        return super(type(self), self).forward(hidden_states, position_embeddings=position_embeddings,
                                               attention_mask=attention_mask, past_key_values=past_key_values,
                                               **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = rope(self.q_proj(hidden_states).view(hidden_shape), cos, sin).transpose(1, 2)
    key_states = rope(self.k_proj(hidden_states).view(hidden_shape), cos, sin).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    attention_interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                   hf.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


# class name -> the forward its fused same-named subclass gets
_FUSED_FORWARDS = {name: _fused_rms_norm_forward for name in RMS_NORM_CLASSES}
_FUSED_FORWARDS["LlamaAttention"] = _fused_rope_attention_forward


def _fused_class(cls: type) -> type:
    """A subclass of `cls` with the same name (code that picks layers by class name,
    like ln_tuning, still finds it) whose forward takes the fused kernels."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _FUSED_FORWARDS[cls.__name__],
                                                          "__module__": cls.__module__, "fused": True})
    return _FUSED_CLASSES[cls]


def use_fused_layers(model: nn.Module) -> int:
    """Give every Llama-style RMSNorm and attention of `model` the fused kernels of
    engine.fused (a class change: the module, its parameters, names and state dict
    stay); returns how many changed."""
    n = 0
    for m in model.modules():
        cls = type(m)
        if cls.__name__ in _FUSED_FORWARDS and not getattr(cls, "fused", False) and (
                cls.__name__ == "LlamaAttention" or hasattr(m, "variance_epsilon")):
            m.__class__ = _fused_class(cls)
            n += 1
    return n


class FastLinear(nn.Linear):
    """nn.Linear computed by `engine.gemm.linear`: same parameters, names and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)


def use_fast_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a FastLinear (a class change: the module,
    its parameters and its place in the model stay); returns how many changed."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = FastLinear
            n += 1
    return n


def output_is_unsaved(layer: nn.Module) -> bool:
    """True for layers whose output no backward needs, so it may be changed in place
    (plain linears, and layers that declare it with `output_unsaved = True`)."""
    return type(layer) in (nn.Linear, FastLinear) or getattr(type(layer), "output_unsaved", False)
