"""Compacter and Compacter++: bottleneck adapters whose projections are PHM layers.

Karimi Mahabadi, Henderson & Ruder 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers", NeurIPS 2021, arXiv:2106.04647.

Each adapter is Houlsby's bottleneck (down-projection, nonlinearity, up-projection,
residual), but each projection's weight W (out x in) is a parameterized
hypercomplex multiplication (PHM) layer, a sum of n Kronecker products

    W = sum_{i=1..n} A_i (x) B_i,   A_i: n x n,   B_i: (out/n) x (in/n),

where the "slow" weights A_i are one tensor shared by every adapter projection of
the model, and each "fast" weight is low-rank, B_i = s_i t_i^T with rank
`phm_rank` (default 1). So `n` must divide both the hidden size and the bottleneck
width. Per adapter: 2 * phm_rank * (hidden + width) weights plus the two biases;
once for the model: n^3.

Variants: `compacter` puts adapters after the attention and after the FFN of every
block (Houlsby's placement); `compacter++` only after the FFN (Pfeiffer's). The
norms of the adapted sublayers train too, as in the paper (`train_layernorm`).

Initialisation: A_i ~ N(0, 1/n); the down projection's s, t random with
Kaiming-like variance of W; the up projection's s zero, so each adapter starts as
the identity (like LoRA's B = 0). Not mergeable (the nonlinearity sits between
the projections); no peft format (peft has no Compacter), saved as our own file.
The adapter layers and their placement are those of engine.methods.bottleneck.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from .base import ApplyContext, MethodSpec, freeze_all
from .bottleneck import (ACTIVATIONS, BottleneckSize, add_serial_adapters, bottleneck_width,
                         check_family, chosen_layers, sublayer_norm_params)
from .plan import Plan, empty_plan, layers_subset

DEFAULT_REDUCTION = 8.0
RULE_ATTR = "studio_phm_rule"


class CompacterConfig(BottleneckSize):
    name: Literal["compacter"] = "compacter"
    reduction_factor: Optional[float] = Field(
        None, gt=0, description="bottleneck = hidden_size / reduction_factor (default 8 when no size is given)")
    n: int = Field(4, gt=0, le=64, description="PHM dimension n: number of Kronecker terms; must divide the "
                                               "hidden size and the bottleneck width")
    phm_rank: int = Field(1, gt=0, le=1024, description="rank of each fast weight B_i = s_i t_i^T")
    variant: Literal["compacter", "compacter++"] = Field(
        "compacter", description="compacter: adapters after attention and FFN; compacter++: after the FFN only")
    train_layernorm: bool = Field(True, description="also train the norms of the adapted sublayers (the paper does)")

    @model_validator(mode="after")
    def _n_divides_size(self):
        if self.bottleneck_size is not None and self.bottleneck_size % self.n:
            raise ValueError(f"method.n: {self.n} must divide method.bottleneck_size ({self.bottleneck_size})")
        return self

    @property
    def placement(self) -> str:
        return "both" if self.variant == "compacter" else "ffn"


def compacter_width(hidden: int, cfg: CompacterConfig) -> int:
    """The bottleneck width; checks that n divides it and the hidden size."""
    width = bottleneck_width(hidden, cfg.bottleneck_size, cfg.reduction_factor or DEFAULT_REDUCTION)
    if hidden % cfg.n or width % cfg.n:
        raise ValueError(f"method.n: the PHM dimension {cfg.n} must divide both the hidden size ({hidden}) and "
                         f"the bottleneck width ({width}); pick another n, bottleneck_size or reduction_factor")
    return width


class PHMRule(nn.Module):
    """The shared slow weights: `weight[i]` is A_i (n x n)."""

    def __init__(self, n: int, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n, n, device=device, dtype=dtype) / math.sqrt(n))


class PHMLinear(nn.Module):
    """y = x W^T + b with W = sum_i A_i (x) (s_i t_i^T); A comes from the shared rule."""

    def __init__(self, rule: PHMRule, in_features: int, out_features: int, rank: int, *, zero_output: bool,
                 device=None, dtype=None):
        super().__init__()
        n = rule.weight.shape[0]
        self._rule = [rule]            # a list: the shared rule is registered once, on the model
        self.in_features, self.out_features, self.n = in_features, out_features, n
        kw = dict(device=device, dtype=dtype)
        self.phm_s = nn.Parameter(torch.empty(n, out_features // n, rank, **kw))
        self.phm_t = nn.Parameter(torch.empty(n, in_features // n, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        with torch.no_grad():
            # var(W) = n * var(A) * rank * var(s) * var(t) = 1 / in_features with var(A) = 1/n
            nn.init.normal_(self.phm_t, std=1.0 / math.sqrt(rank * in_features))
            if zero_output:
                nn.init.zeros_(self.phm_s)
            else:
                nn.init.normal_(self.phm_s, std=1.0)

    @property
    def rule(self) -> PHMRule:
        return self._rule[0]

    def phm_weight(self) -> torch.Tensor:
        """W (out x in) = sum_i kron(A_i, s_i t_i^T)."""
        return phm_weight(self.rule.weight, self.phm_s, self.phm_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PHMLinearFunction.apply(x, self.rule.weight, self.phm_s, self.phm_t, self.bias)


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum_i kron(rule[i], s[i] @ t[i]^T) as one (n*p) x (n*q) matrix."""
    fast = torch.einsum("ipr,iqr->ipq", s, t)                                 # n x out/n x in/n
    n, p, q = fast.shape
    return torch.einsum("iab,ipq->apbq", rule, fast).reshape(n * p, n * q)


class PHMLinearFunction(torch.autograd.Function):
    """x W^T + b with W built from (A, s, t) in forward and rebuilt in backward, so that
    backward keeps only x and the small factors, not a weight-sized W per layer (the
    same saved activations as a plain bottleneck adapter)."""

    @staticmethod
    def forward(ctx, x, rule, s, t, bias):
        with torch.no_grad():
            w = phm_weight(rule, s, t)
        ctx.save_for_backward(x, rule, s, t)
        ctx.bias_dtype = bias.dtype
        return F.linear(x, w, bias)        # under autocast: in the autocast dtype

    @staticmethod
    def backward(ctx, gy):
        # backward runs outside autocast: W is rebuilt in the parameters' dtype and every
        # product is taken in one dtype explicitly (gy may be bf16 where the factors are fp32)
        x, rule, s, t = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_(True) for v in (rule, s, t)]
            w = phm_weight(*leaves)
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = (gy @ w.detach().to(gy.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = gy2.T.to(w.dtype) @ x.reshape(-1, x.shape[-1]).to(w.dtype)
        g_rule, g_s, g_t = torch.autograd.grad(w, leaves, gw)
        return gx, g_rule, g_s, g_t, gy2.sum(0).to(ctx.bias_dtype)


class PHMBottleneck(nn.Module):
    """x -> up(act(down(x))) with PHM projections (the adapter body, without the residual)."""

    def __init__(self, rule: PHMRule, dim: int, width: int, rank: int, activation: str, *, device=None,
                 dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.down = PHMLinear(rule, dim, width, rank, zero_output=False, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = PHMLinear(rule, width, dim, rank, zero_output=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def shared_rule(model: nn.Module) -> PHMRule:
    return getattr(model, RULE_ATTR)


def apply_compacter(model: nn.Module, cfg: CompacterConfig, ctx: ApplyContext) -> None:
    check_family(model, "compacter", parallel=False)
    hidden = model.config.hidden_size
    width = compacter_width(hidden, cfg)
    layers = chosen_layers(model.config.num_hidden_layers, cfg.layers)
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    w = model.get_input_embeddings().weight
    rule = PHMRule(cfg.n, device=w.device, dtype=w.dtype)
    setattr(model, RULE_ATTR, rule)

    def make(base: nn.Module) -> PHMBottleneck:
        p = next(base.parameters())
        return PHMBottleneck(rule, hidden, width, cfg.phm_rank, cfg.activation, device=p.device, dtype=p.dtype)

    add_serial_adapters(model, width, cfg.activation, layers, cfg.placement, 0.0, cfg.train_layernorm,
                        make_adapter=make, norms=cfg.placement)


def phm_params(in_features: int, out_features: int, rank: int) -> int:
    """One PHM layer's own parameters (the shared A_i not included)."""
    return rank * (in_features + out_features) + out_features


def count_compacter(dims, cfg: CompacterConfig, task: str) -> int:
    h = dims.hidden_size
    width = compacter_width(h, cfg)
    layers = chosen_layers(dims.num_layers, cfg.layers)
    sites = 2 if cfg.placement == "both" else 1
    per = sites * (phm_params(h, width, cfg.phm_rank) + phm_params(width, h, cfg.phm_rank))
    norms = sublayer_norm_params(dims, layers, cfg.placement) if cfg.train_layernorm else 0
    return cfg.n ** 3 + len(layers) * per + norms


def plan_compacter(dims, cfg: CompacterConfig, task: str) -> Plan:
    """The activations of a bottleneck adapter at each site (W itself is token-independent)."""
    width = compacter_width(dims.hidden_size, cfg)
    sites = ["attn", "ffn"] if cfg.placement == "both" else [cfg.placement]
    plan = empty_plan(dims)
    for i in layers_subset(dims, cfg.layers):
        plan.layers[i].adapters = [("serial", s, width) for s in sites]
        plan.layers[i].norms = cfg.train_layernorm
    return plan


SPEC = MethodSpec(
    name="compacter", config_cls=CompacterConfig, apply=apply_compacter,
    paper="Karimi Mahabadi et al. 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers "
          "(arXiv:2106.04647)",
    summary="Bottleneck adapters whose projections are sums of Kronecker products (PHM) with shared slow weights "
            "and rank-1 fast weights; compacter++ puts them after the FFN only.",
    trains="the shared A_i (n^3), each adapter's low-rank fast weights and biases, and the adapted sublayers' norms",
    count_trainable=count_compacter, family="adapter", plan=plan_compacter,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)
