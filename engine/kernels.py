"""Leaner building blocks the engine swaps into a loaded model before a method is
applied. Same math, same parameter names (so adapters, exports and peft interop
are untouched), fewer bytes saved for backward.

- `SwiGLUMLP`: the gated feed-forward of Llama-style models (SwiGLU, Shazeer 2020,
  "GLU Variants Improve Transformer", arXiv:2002.05202), down(silu(gate(x)) * up(x)).
  Autograd's default keeps gate(x), silu(gate(x)) and up(x) for backward: three
  tensors of the FFN's width per token, the largest activation of the block. The
  fused product keeps gate(x) and up(x) only and recomputes silu in backward — the
  idea behind Liger Kernel's and Unsloth's fused SwiGLU; on fp32 CPU tensors it is
  one C loop each way (engine.fused), else plain torch ops.
- `use_fused_layers`: Llama's RMSNorm (frozen weight) and the rotary embedding in
  its attention run as one C loop each way instead of a chain of torch ops
  (engine.fused; same saved tensors, fp32 CPU training).
- `FastLinear`: nn.Linear whose fp32 CPU matmuls (forward, and the input gradient
  in backward) run on whichever of oneDNN's matmul primitive and the BLAS sgemm
  that `F.linear` calls was measured faster for that shape on this machine (oneDNN
  15-40% faster on AMD EPYC, BLAS/MKL 5-10% faster on recent Xeons; see
  `_BackendTrial`). Same fp32 arithmetic (no bf16/TF32 down-conversion; results
  differ only by summation order, ~1e-6 relative), the same saved tensors.
  Everything else (CUDA, bf16, autocast, float64, builds without oneDNN) takes
  `F.linear`. `STUDIO_ONEDNN_LINEAR=auto|1|0` (default auto: measure; 1: always
  oneDNN; 0: never).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fused


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
    """silu(gate) * up: one fused C loop on fp32 CPU tensors (engine.fused), else torch
    ops; under autograd both keep only gate and up for backward."""
    if fused.applies(gate, up):
        return fused.swiglu(gate, up)
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


# RMSNorm classes whose forward is exactly transformers' LlamaRMSNorm: fp32 statistics,
# weight * normalized input, epsilon in `variance_epsilon`
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_FUSED_CLASSES: dict[type, type] = {}


def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # a training weight (ln_tuning, full) keeps the model's own ops: what they save is
    # what the memory estimator counts for that case
    if not self.weight.requires_grad and fused.applies(hidden_states):
        return fused.rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
    return super(type(self), self).forward(hidden_states)


def _fused_rope_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                                  past_key_values=None, **kwargs):
    """transformers' LlamaAttention.forward (5.x) step for step, with the rotary
    embedding of q and k in one fused pass each (engine.fused.rope). Used while
    training on fp32 CPU; anything else goes to the original forward."""
    from transformers.models.llama import modeling_llama as hf

    cos, sin = position_embeddings if position_embeddings is not None else (None, None)
    if not (torch.is_grad_enabled() and cos is not None and cos.dtype is torch.float32
            and fused.applies(hidden_states)):
        return super(type(self), self).forward(hidden_states, position_embeddings=position_embeddings,
                                               attention_mask=attention_mask, past_key_values=past_key_values,
                                               **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = fused.rope(self.q_proj(hidden_states).view(hidden_shape), cos, sin).transpose(1, 2)
    key_states = fused.rope(self.k_proj(hidden_states).view(hidden_shape), cos, sin).transpose(1, 2)
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


def _find_onednn_linear():
    """torch's oneDNN linear op (the one Inductor uses on CPU), or None."""
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


GEMM_MODES = ("auto", "onednn", "blas")


def _mode_from_env() -> str:
    """STUDIO_ONEDNN_LINEAR: `auto` (default: time both per GEMM shape, keep the
    faster), `1`/`on` (always oneDNN), `0`/`off` (always BLAS)."""
    raw = os.environ.get("STUDIO_ONEDNN_LINEAR", "auto").strip().lower()
    if raw in ("0", "false", "no", "off", "blas"):
        return "blas"
    if raw in ("1", "true", "yes", "on", "onednn"):
        return "onednn"
    if raw in ("", "auto"):
        return "auto"
    raise ValueError(f"STUDIO_ONEDNN_LINEAR={raw!r}: expected auto, 1 (always oneDNN) or 0 (never)")


_ONEDNN = _find_onednn_linear()
_MODE = _mode_from_env() if _ONEDNN is not None else "blas"
# (kind, rows rounded up to a power of two, inner, outer) -> True when oneDNN was
# faster, False when BLAS was, or the _BackendTrial still timing them
_FASTER_ON_ONEDNN: dict[tuple, object] = {}
# GEMMs below this many multiply-adds take BLAS untimed: there the call overhead dominates
TUNE_MIN_MACS = 1 << 22


def gemm_mode() -> str:
    return _MODE


def onednn_enabled() -> bool:
    """True when fp32 CPU GEMMs may run on oneDNN (mode `auto` or `onednn`)."""
    return _MODE != "blas"


def set_gemm_mode(mode: str) -> None:
    """Choose the fp32 CPU GEMM backend at run time (benchmarks, tests): `auto`,
    `onednn` or `blas`. Forgets earlier timings."""
    global _MODE
    if mode not in GEMM_MODES:
        raise ValueError(f"GEMM mode {mode!r}: expected one of {', '.join(GEMM_MODES)}")
    _MODE = mode if _ONEDNN is not None else "blas"
    _FASTER_ON_ONEDNN.clear()


def set_onednn_enabled(enabled: bool) -> None:
    """Always oneDNN (True) or never (False)."""
    set_gemm_mode("onednn" if enabled else "blas")


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_MODE != "blas" and x.device.type == "cpu" and x.dtype is torch.float32
            and weight.dtype is torch.float32 and x.numel() > 0 and not torch.is_autocast_enabled("cpu"))


def _onednn_2d(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ w.T (+ bias) for a 2-D `a` on oneDNN."""
    return _ONEDNN(a, w, bias, "none", [], "")


class _BackendTrial:
    """In-place timing of the two backends for one GEMM shape: the first calls of the
    shape alternate between them as training runs, each call timed where it really
    happens (cold weights, caches shared with the rest of the step: a GEMM timed
    alone in a loop flatters oneDNN, which repacks the weight on every call). Each
    backend's first call is not counted (oneDNN builds its primitive then), and
    after `SAMPLES` more calls each the one with the lower median is kept. A GEMM
    over 20 ms (an LM head) is decided on one call each: a primitive's set-up is
    small beside it, and it runs only once or twice per step."""

    SAMPLES = 3
    LONG_CALL_S = 0.02
    __slots__ = ("times",)

    def __init__(self):
        self.times: tuple[list[float], list[float]] = ([], [])

    def next_backend(self) -> int:
        """0 for oneDNN, 1 for BLAS: whichever has fewer timings so far."""
        return 0 if len(self.times[0]) <= len(self.times[1]) else 1

    def record(self, backend: int, seconds: float) -> Optional[bool]:
        """Store one timing; once both have enough, True when oneDNN was faster."""
        self.times[backend].append(seconds)
        if self.times[0] and self.times[0][0] > self.LONG_CALL_S:
            counted, need = self.times, 1
        else:
            counted, need = [t[1:] for t in self.times], self.SAMPLES
        if min(len(c) for c in counted) < need:
            return None
        return statistics.median(counted[0]) < statistics.median(counted[1])


def _tuned(kind: str, a: torch.Tensor, n_out: int, onednn, blas) -> torch.Tensor:
    """Run the GEMM on the backend measured faster for this shape on this machine.
    oneDNN beats MKL's sgemm by 15-40% on AMD EPYC (AVX-512) and trails it by 5-10%
    on recent Xeons, so neither is hard-wired. Rows are bucketed to powers of two, so
    variable-length batches share a decision."""
    if _MODE == "onednn":
        return onednn()
    rows, inner = a.shape
    if _MODE == "blas" or rows * inner * n_out < TUNE_MIN_MACS:
        return blas()
    key = (kind, 1 << max(rows - 1, 0).bit_length(), inner, n_out)
    choice = _FASTER_ON_ONEDNN.get(key)
    if isinstance(choice, bool):
        return onednn() if choice else blas()
    trial = choice if choice is not None else _FASTER_ON_ONEDNN.setdefault(key, _BackendTrial())
    backend = trial.next_backend()
    t0 = time.perf_counter()
    out = (onednn, blas)[backend]()
    decided = trial.record(backend, time.perf_counter() - t0)
    if decided is not None:
        _FASTER_ON_ONEDNN[key] = decided
    return out


def _linear_2d(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ w.T (+ bias), 2-D, no autograd, on the faster backend."""
    return _tuned("a@wT", a, w.shape[0], lambda: _onednn_2d(a, w, bias), lambda: F.linear(a, w, bias))


def matmul_t(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T for 2-D tensors, without autograd (on the faster backend when oneDNN applies)."""
    return _linear_2d(a, w) if _takes_onednn(a, w) else a @ w.t()


def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w for 2-D tensors, without autograd (on the faster backend when oneDNN applies)."""
    if not _takes_onednn(a, w):
        return a @ w
    return _tuned("a@w", a, w.shape[1], lambda: _onednn_2d(a, w.t()), lambda: a @ w)


class _FastLinearFn(torch.autograd.Function):
    """y = x W^T + b with the forward and input-gradient GEMMs on the faster backend.
    Saves W for the input gradient, and x only when W trains (what autograd saves for
    F.linear). The weight gradient stays on BLAS: it measured no faster on oneDNN."""

    @staticmethod
    def forward(ctx, x2, weight, bias):
        # 2-D in and out: a view made here could not be added to in place afterwards
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        return _linear_2d(x2, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = matmul(grad, weight) if need_x else None
        dw = grad.t() @ x2 if need_w else None
        db = grad.sum(0) if need_b else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear; fp32 CPU tensors on the faster of oneDNN and BLAS."""
    if not _takes_onednn(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _FastLinearFn.apply(x2, weight, bias)
    else:
        y = _linear_2d(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class FastLinear(nn.Linear):
    """nn.Linear computed by `linear`: same parameters, names and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def output_is_unsaved(layer: nn.Module) -> bool:
    """True for layers whose output no backward needs, so it may be changed in place
    (plain linears, and layers that declare it with `output_unsaved = True`)."""
    return type(layer) in (nn.Linear, FastLinear) or getattr(type(layer), "output_unsaved", False)


def use_fast_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a FastLinear (a class change: the module,
    its parameters and its place in the model stay); returns how many changed."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = FastLinear
            n += 1
    return n
