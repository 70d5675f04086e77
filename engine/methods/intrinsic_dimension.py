"""Intrinsic dimension: train in a random d-dimensional subspace of the weights.

Aghajanyan, Zettlemoyer, Gupta, "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning", ACL 2021, arXiv:2012.13255 (after
Li, Farkhoor, Liu, Yosinski, "Measuring the Intrinsic Dimension of Objective
Landscapes", ICLR 2018, arXiv:1804.08838).

The weights θ (D numbers) are frozen at θ₀ and reparametrised as

    θ = θ₀ + P θ_d,      θ_d ∈ ℝ^d the only trainable vector (zero at the start),

P a fixed random D × d matrix regenerated from `projection_seed`. d90, the
smallest d that reaches 90% of full fine-tuning's metric, is the model's
intrinsic dimension for the task (studio.d90 plots it from a sweep over d).

What θ is here: the weight and bias of every target linear layer (default
`all-linear`: every linear of every block); embeddings, norms and heads stay
frozen (the classification head trains, as for every method). P is cut into one
row block P_i per target layer (D_i = out·in (+ out) rows), so each layer builds
its own update ΔW_i = P_i θ_d in its forward and the adapter merges layer by
layer (θ₀ + P θ_d written into the weights).

Two kinds of P, both with (near) unit-norm, near-orthogonal columns per layer:

- `dense`: P_i with i.i.d. N(0, 1/D_i) entries, held in memory (D·d numbers);
- `fastfood` (Le, Sarlós, Smola 2013; the transform Li et al. and Aghajanyan et
  al. use): P_i = √(L/D_i) · rows 1..D_i of the stacked blocks
  V_k = H G_k Π H B / √(L·ΣG_k²), k = 1..⌈D_i/L⌉, applied to θ_d zero-padded to
  L = 2^⌈log₂ d⌉. H is the L × L Walsh–Hadamard matrix (applied by a fast
  transform, never built beyond 32 × 32), B random signs, Π a random
  permutation, G_k Gaussian; B and Π are shared by a layer's blocks (so H B θ_d is
  computed once per layer), G_k is drawn per block. Time O(D log d), memory
  4 bytes per element of θ (the G_k), never D × d. Each block's columns have
  norm exactly 1 before the √(L/D_i) truncation factor.
- `auto` (default): dense when D·d ≤ 2²⁶ elements, else Fastfood.

`said: true` is the paper's SAID: one learned scale λ_i per target layer,
θ_i = θ₀,i + λ_i P_i θ_d (λ_i = 1 at the start). The paper takes the m scales
out of the d budget; here they come on top: trainable = d + m.

Both transforms are autograd Functions whose backward applies Pᵀ, so nothing
D × d (and no buffer) is saved for backward; a layer keeps its input and its
rebuilt weight W + ΔW (and P_i θ_d for SAID's scale): the estimator's
`weight_saved`. P itself lives in non-persistent buffers (Fastfood: the G_k, 4
bytes per element of θ; dense: 4·D·d bytes), which are not parameters: the
estimator's rows do not count them (its total was 15% under the step's
allocator peak on MiniLM and 21% under on SmolLM2-135M for that reason, while
its activations were within 1%). Mergeable; no peft format (peft has no such method): saved as
`studio_adapter.safetensors` (θ_d, the SAID scales, the head), P regenerated
from the run config.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..arch import set_submodule
from .base import AdapterLayer, ApplyContext, MethodConfig, MethodSpec, freeze_all, merge_and_unload
from .plan import Plan
from .reparam import FAMILY, target_names, weight_saved_plan
from .targeting import check_target_list, resolve_targets_in_dims

DEFAULT_TARGETS = "all-linear"
AUTO_DENSE_MAX = 1 << 26          # `auto` picks dense up to this many elements of P (256 MiB in fp32)
DENSE_MAX = 1 << 28               # an explicit `dense` beyond this is refused (1 GiB in fp32)
HADAMARD_BITS = 5                 # the fast transform multiplies by 32 x 32 Hadamard factors


class IntrinsicDimensionConfig(MethodConfig):
    name: Literal["intrinsic_dimension"] = "intrinsic_dimension"
    d: int = Field(1000, ge=1, le=1 << 24, description="dimension of the random subspace (the trainable θ_d)")
    projection: Literal["auto", "dense", "fastfood"] = Field(
        "auto", description="random projection P: dense Gaussian, Fastfood, or auto (dense when D·d ≤ 2^26)")
    said: bool = Field(False, description="SAID: also learn one scale per target layer (d + layers trainable)")
    projection_seed: int = Field(0, ge=0, description="seed that regenerates P")
    target_modules: Union[list[str], str, None] = Field(
        None, description="the linear layers whose weights and biases form θ; default 'all-linear'")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)


# ---- the fast Walsh–Hadamard transform ------------------------------------------------------------

_HADAMARD: dict = {}


def hadamard_matrix(bits: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The 2^bits x 2^bits Sylvester Hadamard matrix (entries ±1, symmetric)."""
    key = (bits, str(device), dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=dtype)
        for _ in range(bits):
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = h.to(device)
    return _HADAMARD[key]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H_L along the last dimension (L a power of two, unnormalised), in
    O(L log L): H_L is the Kronecker product of small Hadamard factors, each
    applied by one matrix product over its axis."""
    L = x.shape[-1]
    m = L.bit_length() - 1
    if L != 1 << m:
        raise ValueError(f"fwht: length {L} is not a power of two")
    lead, rows = x.shape[:-1], x.numel() // max(L, 1)
    done = 0
    while done < m:
        k = min(HADAMARD_BITS, m - done)
        h = hadamard_matrix(k, x.device, x.dtype)
        y = x.reshape(rows * (L >> (done + k)), 1 << k, 1 << done)
        x = (y.squeeze(-1) @ h).unsqueeze(-1) if done == 0 else torch.matmul(h, y)
        done += k
    return x.reshape(*lead, L)


# ---- the projections: P_i θ_d and P_iᵀ g ---------------------------------------------------------

class DenseProjection(nn.Module):
    """P_i (D_i x d), i.i.d. N(0, 1/D_i): columns of norm ≈ 1."""

    def __init__(self, rows: int, d: int, gen: torch.Generator):
        super().__init__()
        self.rows, self.d = rows, d
        self.register_buffer("matrix", torch.randn(rows, d, generator=gen) / math.sqrt(rows), persistent=False)

    def forward_map(self, theta: torch.Tensor) -> torch.Tensor:
        return self.matrix @ theta.to(self.matrix.dtype)

    def transpose_map(self, g: torch.Tensor) -> torch.Tensor:
        return self.matrix.T @ g.to(self.matrix.dtype)

    def materialize(self) -> torch.Tensor:
        return self.matrix.clone()


class FastfoodProjection(nn.Module):
    """P_i = √(L/D_i) · [V_1; V_2; …][:D_i], V_k = H G_k Π H B / √(L·ΣG_k²) (see the module docstring)."""

    def __init__(self, rows: int, d: int, gen: torch.Generator):
        super().__init__()
        self.rows, self.d = rows, d
        self.L = 1 << max(0, (d - 1).bit_length())
        self.blocks = -(-rows // self.L)
        L, n = self.L, self.blocks
        sign = torch.randint(0, 2, (L,), generator=gen).float() * 2 - 1
        perm = torch.randperm(L, generator=gen)
        gauss = torch.randn(n, L, generator=gen)
        scale = torch.rsqrt(L * gauss.pow(2).sum(1)) * math.sqrt(L / rows)
        self.register_buffer("sign", sign, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("gauss", gauss * scale[:, None], persistent=False)   # G_k with its block's factor

    def forward_map(self, theta: torch.Tensor) -> torch.Tensor:
        x = F.pad(theta.float(), (0, self.L - self.d)) * self.sign.float()
        z = fwht(x)[self.perm]                                  # Π H B θ: once for all blocks
        return fwht(self.gauss.float() * z).reshape(-1)[: self.rows]    # H G_k (…), stacked, cut to D_i

    def transpose_map(self, g: torch.Tensor) -> torch.Tensor:
        y = F.pad(g.float(), (0, self.blocks * self.L - self.rows)).reshape(self.blocks, self.L)
        z = (fwht(y) * self.gauss.float()).sum(0)               # Σ_k G_k H g_k
        back = torch.empty_like(z)
        back[self.perm] = z                                     # Πᵀ
        return (fwht(back) * self.sign.float())[: self.d]

    def materialize(self) -> torch.Tensor:
        """P_i as a dense D_i x d matrix (for tests on small layers)."""
        eye = torch.eye(self.d, device=self.gauss.device)
        return torch.stack([self.forward_map(e) for e in eye], 1)


class _Project(torch.autograd.Function):
    """P θ with backward Pᵀ g: saves nothing for backward (P is a fixed buffer)."""

    @staticmethod
    def forward(ctx, theta, proj):
        ctx.proj, ctx.dtype = proj, theta.dtype
        return proj.forward_map(theta)

    @staticmethod
    def backward(ctx, g):
        return ctx.proj.transpose_map(g).to(ctx.dtype), None


class Subspace(nn.Module):
    """θ_d, shared by every layer (one module, held by each, so it is one parameter)."""

    def __init__(self, d: int, device=None):
        super().__init__()
        self.theta_d = nn.Parameter(torch.zeros(d, device=device))


# ---- the layer -----------------------------------------------------------------------------------

class IntrinsicLinear(AdapterLayer):
    """y = x (W + ΔW)ᵀ + (b + Δb), with [vec ΔW; Δb] = λ · P_i θ_d (λ only with SAID)."""

    def __init__(self, base: nn.Linear, subspace: Subspace, proj: nn.Module, said: bool):
        super().__init__(base)
        self.id_subspace = subspace
        self.id_projection = proj
        out, fin = base.weight.shape
        self.n_weight = out * fin
        if said:
            self.said_scale = nn.Parameter(torch.ones(1, device=base.weight.device))
        else:
            self.said_scale = None

    def flat_delta(self) -> torch.Tensor:
        flat = _Project.apply(self.id_subspace.theta_d, self.id_projection)
        return flat * self.said_scale if self.said_scale is not None else flat

    def _split(self, flat: torch.Tensor):
        w = self.base_layer.weight
        dw = flat[: self.n_weight].view_as(w).to(w.dtype)
        db = flat[self.n_weight:].to(w.dtype) if self.base_layer.bias is not None else None
        return dw, db

    def delta_weight(self) -> torch.Tensor:
        return self._split(self.flat_delta())[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        dw, db = self._split(self.flat_delta())
        b = self.base_layer.bias
        return F.linear(x, self.base_layer.weight + dw, None if b is None else b + db)

    @torch.no_grad()
    def _add(self, sign: float) -> None:
        dw, db = self._split(self.flat_delta())
        self.base_layer.weight.add_(dw, alpha=sign)
        if db is not None:
            self.base_layer.bias.add_(db, alpha=sign)

    def merge(self) -> None:
        if not self.merged:
            self._add(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add(-1.0)
            self.merged = False


# ---- apply, count, plan --------------------------------------------------------------------------

def layer_rows(out_features: int, in_features: int, bias: bool) -> int:
    """D_i: the numbers of θ one linear layer holds."""
    return out_features * in_features + (out_features if bias else 0)


def choose_projection(cfg: IntrinsicDimensionConfig, total_rows: int) -> str:
    """The projection `cfg` gets for a θ of `total_rows` numbers; an explicit dense P
    that would be too large is refused."""
    elements = total_rows * cfg.d
    if cfg.projection == "auto":
        return "dense" if elements <= AUTO_DENSE_MAX else "fastfood"
    if cfg.projection == "dense" and elements > DENSE_MAX:
        raise ValueError(f"method.projection: a dense P would hold D·d = {total_rows:,} x {cfg.d:,} = "
                         f"{elements:,} numbers (limit {DENSE_MAX:,}); use 'fastfood' or 'auto'")
    return cfg.projection


def apply_intrinsic_dimension(model: nn.Module, cfg: IntrinsicDimensionConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    names = target_names(model, cfg.target_modules or DEFAULT_TARGETS, "intrinsic_dimension")
    bases = [model.get_submodule(n) for n in names]
    rows = [layer_rows(b.out_features, b.in_features, b.bias is not None) for b in bases]
    kind = choose_projection(cfg, sum(rows))
    device = bases[0].weight.device
    subspace = Subspace(cfg.d, device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.projection_seed)
    cls = DenseProjection if kind == "dense" else FastfoodProjection
    for n, base, r in zip(names, bases, rows):
        proj = cls(r, cfg.d, gen).to(device)
        set_submodule(model, n, IntrinsicLinear(base, subspace, proj, cfg.said))


def projection_kind(model: nn.Module) -> str:
    """'dense' or 'fastfood': the P an applied model uses."""
    for m in model.modules():
        if isinstance(m, IntrinsicLinear):
            return "dense" if isinstance(m.id_projection, DenseProjection) else "fastfood"
    raise ValueError("the model has no intrinsic-dimension layers")


def _targets(dims, cfg: IntrinsicDimensionConfig, task: str):
    return resolve_targets_in_dims(dims, cfg.target_modules or DEFAULT_TARGETS, task)


def count_intrinsic_trainable(dims, cfg: IntrinsicDimensionConfig, task: str) -> int:
    return cfg.d + (len(_targets(dims, cfg, task)) if cfg.said else 0)


def plan_intrinsic(dims, cfg: IntrinsicDimensionConfig, task: str) -> Plan:
    """Each target keeps its input and its rebuilt weight W + ΔW (out·in); with SAID
    also P_i θ_d (D_i), which the scale's gradient reads."""
    sizes = {}
    for l in _targets(dims, cfg, task):
        sizes[l.name] = l.in_features * l.out_features
        if cfg.said:
            sizes[l.name] += layer_rows(l.out_features, l.in_features, l.bias)
    return weight_saved_plan(dims, sizes)


SPEC = MethodSpec(
    name="intrinsic_dimension", config_cls=IntrinsicDimensionConfig, apply=apply_intrinsic_dimension,
    paper="Aghajanyan et al. 2021, Intrinsic Dimensionality Explains the Effectiveness of Language Model "
          "Fine-Tuning (arXiv:2012.13255)",
    summary="Trains only θ_d ∈ ℝ^d: the weights move in a random d-dimensional subspace, θ = θ₀ + P θ_d "
            "(dense Gaussian or Fastfood P; SAID adds a scale per layer); sweep d to find d90; mergeable.",
    trains="one d-dimensional vector θ_d (plus one scale per target layer with SAID)",
    mergeable=True, merge=merge_and_unload, count_trainable=count_intrinsic_trainable,
    family=FAMILY, plan=plan_intrinsic,
    default_lr=0.03,   # bench/RESULTS-default-lr.md
)
