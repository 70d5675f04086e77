"""LoRA: Low-Rank Adaptation, with rsLoRA scaling, PiSSA initialisation, per-module
ranks and random-rank LoRA.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022, arXiv:2106.09685.
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
2023, arXiv:2312.03732 (rsLoRA: scale alpha / sqrt(r)).
Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", NeurIPS 2024, arXiv:2404.02948.

A frozen weight W (out x in) is adapted as W + s * B @ A with A (r x in),
B (out x r) and s = alpha / r (or alpha / sqrt(r) with rsLoRA). Initialisation:
`kaiming` (A Kaiming-uniform, B zero: training starts from the base model),
`gaussian` (A ~ N(0, 1/r), B zero) or `pissa` (A, B from the top-r singular
triplets of W, and W replaced by the residual W - s*B@A, so the output is unchanged).
GPT-2's Conv1D layers (weight stored in x out) are handled as fan-in/fan-out.

Ranks per module: `rank_pattern` / `alpha_pattern` map a regex (matched against
the end of the module name, peft's rule) to a rank / alpha; `random_rank: [lo, hi]`
draws each module's rank uniformly from lo..hi with a draw that depends only on
(`random_rank_seed`, module name), so the exact trainable-parameter count follows
from the config alone.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..arch import arch_of, set_submodule
from ..swaps import FastLinear, output_is_unsaved
from . import lora_fused
from .expert_lora import (add_expert_lora_plan, check_parameter_list, count_expert_lora, expert_export,
                          expert_targets, inject_expert_lora)
from .base import (AdapterLayer, ApplyContext, MethodConfig, MethodSpec, PeftExport, QuantizedLayer, freeze_all,
                   merge_and_unload)
from .plan import Plan, low_rank_plan
from .targeting import (check_target_list, is_conv1d, linear_like, peft_target_list, resolve_targets,
                        resolve_targets_in_dims)

Init = Literal["kaiming", "gaussian", "pissa"]


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, le=4096, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str, None] = Field(
        None, description="module name suffixes, a regex, or 'all-linear'; default per architecture")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    init: Init = Field("kaiming", description="kaiming (B=0) | gaussian (B=0) | pissa (SVD of W)")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module-name regex -> rank")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="module-name regex -> alpha")
    random_rank: Optional[tuple[int, int]] = Field(
        None, description="[lo, hi]: each module's rank drawn uniformly from lo..hi (seeded)")
    random_rank_seed: int = 0
    target_parameters: Optional[list[str]] = Field(
        None, description="expert tensors of a mixture-of-experts model (peft's name), e.g. "
                          "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']; the router stays frozen")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)

    @field_validator("rank_pattern")
    @classmethod
    def _ranks_positive(cls, v):
        return check_rank_pattern(v)

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas_positive(cls, v):
        return check_alpha_pattern(v)

    @field_validator("random_rank")
    @classmethod
    def _range(cls, v):
        if v is not None and not (0 < v[0] <= v[1] <= 4096):
            raise ValueError(f"must be [lo, hi] with 1 <= lo <= hi <= 4096, got {list(v)}")
        return v

    @field_validator("target_parameters")
    @classmethod
    def _parameters(cls, v):
        return check_parameter_list(v)

    @model_validator(mode="after")
    def _one_rank_source(self):
        if self.random_rank is not None and self.rank_pattern:
            raise ValueError("give rank_pattern or random_rank, not both")
        return self

    @model_validator(mode="after")
    def _parameters_options(self):
        if self.target_parameters:
            # the update is on the weight, W + s·B_e A_e, with no input of its own to drop or init from W
            if self.dropout:
                raise ValueError("method.dropout: must be 0 with target_parameters (the expert update is added to "
                                 "the weight, there is no separate input to drop; peft refuses it too)")
            if self.init == "pissa":
                raise ValueError("method.init: 'pissa' is not available with target_parameters "
                                 "(use kaiming or gaussian)")
        return self


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None


def check_rank_pattern(v: dict) -> dict:
    """A rank_pattern's regexes compile and its ranks are in 1..4096."""
    for k, r in v.items():
        _check_regex(k)
        if not 0 < r <= 4096:
            raise ValueError(f"rank for {k!r} must be in 1..4096, got {r}")
    return v


def check_alpha_pattern(v: dict) -> dict:
    """An alpha_pattern's regexes compile and its alphas are > 0."""
    for k, a in v.items():
        _check_regex(k)
        if not a > 0:
            raise ValueError(f"alpha for {k!r} must be > 0, got {a}")
    return v


# ---- ranks and scaling per module ----------------------------------------------------------------

def pattern_value(patterns: dict, name: str):
    """The value of the first pattern that matches the end of `name` on a dot
    boundary (peft's rule), or None."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def random_rank_for(name: str, lo: int, hi: int, seed: int) -> int:
    """A rank in lo..hi that depends only on (seed, module name): a stable hash, not
    Python's salted `hash`, so the engine and the count draw the same ranks."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return lo + int.from_bytes(digest[:8], "big") % (hi - lo + 1)


def module_rank_alpha(cfg: LoraConfig, name: str) -> tuple[int, float]:
    if cfg.random_rank is None and not cfg.rank_pattern and not cfg.alpha_pattern:
        return cfg.r, cfg.alpha      # the common case, asked once per target by every estimate
    r = cfg.r
    if cfg.random_rank is not None:
        r = random_rank_for(name, cfg.random_rank[0], cfg.random_rank[1], cfg.random_rank_seed)
    else:
        r = pattern_value(cfg.rank_pattern, name) or r
    alpha = pattern_value(cfg.alpha_pattern, name) or cfg.alpha
    return r, alpha


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ---- the layer -----------------------------------------------------------------------------------

def layer_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a Conv1D or a quantized linear."""
    if is_conv1d(base):
        i, o = base.weight.shape
        return int(i), int(o)
    return int(base.in_features), int(base.out_features)


def layer_compute_dtype(base: nn.Module) -> torch.dtype:
    dt = getattr(base, "compute_dtype", None) or base.weight.dtype
    return dt if dt.is_floating_point else torch.float32


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as an (out x in) float tensor (dequantized or transposed if needed)."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    return base.weight.T if is_conv1d(base) else base.weight


class LoraLinear(AdapterLayer):
    """A linear layer with a low-rank residual: y = base(x) + s * B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, *,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__(base)
        if r <= 0:
            raise ValueError(f"method.r: must be > 0, got {r}")
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.fan_in_fan_out = is_conv1d(base)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        fin, fout = layer_features(base)
        dev, dt = base.weight.device, layer_compute_dtype(base)
        self.lora_A = nn.Linear(fin, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, fout, bias=False, device=dev, dtype=dt)
        self.init = init
        self.reset_lora_parameters(init)

    # peft-like conveniences
    @property
    def in_features(self):
        return layer_features(self.base_layer)[0]

    @property
    def out_features(self):
        return layer_features(self.base_layer)[1]


    @torch.no_grad()
    def reset_lora_parameters(self, init: str) -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif init == "pissa":
            self.pissa_init()
        else:
            raise ValueError(f"method.init: unknown initialisation {init!r}; use kaiming, gaussian or pissa")

    @torch.no_grad()
    def pissa_init(self) -> None:
        """A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s); W <- W - s*B@A (PiSSA)."""
        if not isinstance(self.base_layer, nn.Linear) and not self.fan_in_fan_out:
            raise ValueError("method.init: 'pissa' needs full-precision linear layers (not quantized ones)")
        w = dense_weight(self.base_layer).float()
        if self.r > min(w.shape):
            raise ValueError(f"method.r: rank {self.r} exceeds the size of a {tuple(w.shape)} weight for PiSSA")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sr = (s[: self.r] / self.scaling).sqrt()
        a = sr[:, None] * vh[: self.r]
        b = u[:, : self.r] * sr[None, :]
        self.lora_A.weight.copy_(a.to(self.lora_A.weight.dtype))
        self.lora_B.weight.copy_(b.to(self.lora_B.weight.dtype))
        residual = w - self.scaling * (b @ a)
        wt = self.base_layer.weight
        wt.copy_((residual.T if self.fan_in_fan_out else residual).to(wt.dtype))
        # the starting point, to export the trained adapter as a plain LoRA on the original W
        self.register_buffer("pissa_A0", a.clone().to(self.lora_A.weight.dtype), persistent=False)
        self.register_buffer("pissa_B0", b.clone().to(self.lora_B.weight.dtype), persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A as an (out x in) tensor."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        # the scale goes on the r-wide activation, not on the out-wide update: one
        # output-sized temporary fewer per adapted layer
        return self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def fused_weight(self):
        """W (out x in) in a given dtype, for the one-node path (engine.methods.lora_fused),
        or None where that path does not apply: dropout (its mask), a merged layer, a
        subclass with its own update, a Conv1D or another wrapped base."""
        if self.merged or not isinstance(self.lora_dropout, nn.Identity) or self.fan_in_fan_out \
                or type(self).lora_out is not LoraLinear.lora_out:
            return None
        base = self.base_layer
        if type(base) in (nn.Linear, FastLinear):
            w = base.weight
            return lambda dt: w if w.dtype == dt else w.to(dt)
        if isinstance(base, QuantizedLayer) and hasattr(base, "dequantize"):
            return lambda dt: base.dequantize(scratch=True).to(dt)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if lora_fused.enabled_for(x):
            weight = self.fused_weight()
            if weight is not None:
                return lora_fused.lora_linear(x, self.lora_A.weight, self.lora_B.weight,
                                              getattr(self.base_layer, "bias", None), weight, self.scaling)
        y = self.base_layer(x)
        if self.merged:
            return y
        dt = self.lora_A.weight.dtype
        update = self.lora_out(x if x.dtype == dt else x.to(dt)).to(y.dtype)
        # a plain Linear's output is saved by nothing for backward: add in place
        if output_is_unsaved(self.base_layer):
            return y.add_(update)
        return y + update


# ---- injection -----------------------------------------------------------------------------------

def inject_lora(model: nn.Module, module_names, r: int, alpha: float, dropout: float = 0.0, *,
                use_rslora: bool = False, init: str = "kaiming", ranks: Optional[dict] = None,
                alphas: Optional[dict] = None, layer_cls=None, **layer_kw) -> dict[str, nn.Module]:
    """Wrap each named linear layer of `model` in a LoRA layer (`layer_cls`, default
    LoraLinear); `ranks` / `alphas` override r / alpha per module name. Does not
    freeze anything. Returns {name: new layer}."""
    layer_cls = layer_cls or LoraLinear
    ranks, alphas = ranks or {}, alphas or {}
    out = {}
    for name in module_names:
        base = model.get_submodule(name)
        layer = layer_cls(base, ranks.get(name, r), alphas.get(name, alpha), dropout,
                          use_rslora=use_rslora, init=init, **layer_kw)
        set_submodule(model, name, layer)
        out[name] = layer
    return out


def default_targets(model: nn.Module):
    return list(arch_of(model).default_lora_targets)


def lora_target_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    targets = cfg.target_modules or default_targets(model)
    return resolve_targets(model, targets, want=linear_like)


def ranks_and_alphas(cfg: LoraConfig, names) -> tuple[dict, dict]:
    ranks, alphas = {}, {}
    for n in names:
        ranks[n], alphas[n] = module_rank_alpha(cfg, n)
    return ranks, alphas


def apply_lora(model: nn.Module, cfg: LoraConfig, ctx: ApplyContext, *, layer_cls=None) -> None:
    freeze_all(model)
    names = lora_target_names(model, cfg)
    ranks, alphas = ranks_and_alphas(cfg, names)
    torch.manual_seed(ctx.seed)
    inject_lora(model, names, cfg.r, cfg.alpha, cfg.dropout, use_rslora=cfg.use_rslora, init=cfg.init,
                ranks=ranks, alphas=alphas, layer_cls=layer_cls)
    apply_expert_lora(model, cfg)


def apply_expert_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """LoRA on the expert tensors `cfg.target_parameters` names (none: nothing)."""
    if cfg.target_parameters:
        params = expert_targets(model, cfg.target_parameters)
        ranks, alphas = ranks_and_alphas(cfg, params)
        inject_expert_lora(model, params, ranks, alphas, use_rslora=cfg.use_rslora, init=cfg.init)


def lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


# ---- exact trainable count from the config -------------------------------------------------------

def lora_targets_in_dims(dims, cfg: LoraConfig, task: str):
    targets = cfg.target_modules or list(dims.arch.default_lora_targets)
    return resolve_targets_in_dims(dims, targets, task)


def count_lora_trainable(dims, cfg: LoraConfig, task: str) -> int:
    total = 0
    for lin in lora_targets_in_dims(dims, cfg, task):
        r, _ = module_rank_alpha(cfg, lin.name)
        total += r * (lin.in_features + lin.out_features)
    return total + count_expert_lora(dims, cfg.target_parameters, lambda n: module_rank_alpha(cfg, n)[0])


# ---- activation plan for the estimator -----------------------------------------------------------

def lora_family_plan(dims, cfg: LoraConfig, task: str, dora: bool = False) -> Plan:
    """Each target linear's rank (per-module patterns and random ranks included)."""
    ranks = {lin.name: module_rank_alpha(cfg, lin.name)[0] for lin in lora_targets_in_dims(dims, cfg, task)}
    plan = low_rank_plan(dims, ranks, float(cfg.dropout or 0.0), dora=dora)
    return add_expert_lora_plan(plan, dims, cfg.target_parameters, lambda n: module_rank_alpha(cfg, n)[0])


def plan_lora(dims, cfg: LoraConfig, task: str) -> Plan:
    return lora_family_plan(dims, cfg, task)


# ---- peft export ---------------------------------------------------------------------------------

def layer_export_tensors(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, rank, alpha) to write for peft. A PiSSA-trained layer is written as
    the rank-2r LoRA [A; A0], [B, -B0] with alpha scaled so that s stays the same:
    on the original W it gives W + s(BA - B0A0) = W_res + sBA."""
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    if getattr(layer, "pissa_A0", None) is None:
        return a, b, layer.r, layer.alpha
    a2 = torch.cat([a, layer.pissa_A0], dim=0)
    b2 = torch.cat([b, -layer.pissa_B0], dim=1)
    alpha2 = layer.alpha * (math.sqrt(2) if layer.use_rslora else 2)
    return a2, b2, 2 * layer.r, alpha2


def peft_rank_config(per_module: dict[str, tuple[int, float]]) -> tuple[int, float, dict, dict]:
    """The base r / alpha (most common) and rank_pattern / alpha_pattern (escaped full
    names) that reproduce each module's rank and alpha under peft's matching."""
    r0 = Counter(r for r, _ in per_module.values()).most_common(1)[0][0]
    a0 = Counter(a for _, a in per_module.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): r for n, (r, _) in per_module.items() if r != r0}
    alpha_pattern = {re.escape(n): a for n, (_, a) in per_module.items() if a != a0}
    return r0, a0, rank_pattern, alpha_pattern


def base_linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers as the unadapted base model has them (adapter
    wrappers count as their base layer; their insides are skipped)."""
    out, inside = [], []
    for n, m in model.named_modules():
        if not n or any(n.startswith(w + ".") for w in inside):
            continue
        if isinstance(m, (AdapterLayer, QuantizedLayer)):
            inside.append(n)
            out.append(n)
        elif linear_like(m):
            out.append(n)
    return out


def lora_peft_export(model: nn.Module, layers, cfg, *, extra_tensors=None, use_dora: bool = False) -> PeftExport:
    tensors, per_module = {}, {}
    for name, layer in layers:
        a, b, r, alpha = layer_export_tensors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        per_module[name] = (r, float(alpha))
    if extra_tensors:
        tensors.update(extra_tensors)
    expert_tensors, per_param, target_parameters = expert_export(model)
    tensors.update(expert_tensors)
    if not per_module:
        raise ValueError("the model has no LoRA layers to export")
    # peft matches rank_pattern against module names and, for target_parameters, full parameter names
    r0, a0, rank_pattern, alpha_pattern = peft_rank_config({**per_module, **per_param})
    all_linear = base_linear_names(model)
    chosen = [n for n, _ in layers]
    config = {
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_list(all_linear, chosen),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": any(l.fan_in_fan_out for _, l in layers),
        "use_rslora": bool(cfg.use_rslora),
        "use_dora": use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    return PeftExport(adapter_config=config, tensors=tensors)


def export_lora_peft(model: nn.Module, cfg: LoraConfig, ctx: ApplyContext) -> PeftExport:
    return lora_peft_export(model, lora_layers(model), cfg)


SPEC = MethodSpec(
    name="lora", config_cls=LoraConfig, apply=apply_lora,
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)",
    summary="Trains a low-rank update B·A beside frozen linear layers (rsLoRA, PiSSA, per-module and "
            "random ranks); mergeable.",
    trains="low-rank matrices A and B on the target linear layers",
    mergeable=True, merge=merge_and_unload, peft_export=export_lora_peft, count_trainable=count_lora_trainable,
    family="lora", plan=plan_lora,
    default_lr=0.005,   # bench/RESULTS-default-lr.md
)
