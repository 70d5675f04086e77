"""LoRA on the 3-D expert tensors of a mixture-of-experts block (`target_parameters`).

In transformers 5.x a MoE block keeps every expert's projections in one parameter per
projection, E x out x in (Mixtral, Qwen3-MoE: `mlp.experts.gate_up_proj` E x 2I x H and
`mlp.experts.down_proj` E x H x I), used as `F.linear(x, param[e])`. They are not linear
layers, so `target_modules` cannot reach them; peft reaches them with
`LoraConfig(target_parameters=[...])` (its `lora.ParamWrapper`), and this module does
the same in peft's format, so an adapter trained here loads in peft and back:

* one wrapper per adapted tensor, around the module that holds it; two tensors of one
  module nest, the first in the module's parameter order innermost (peft's order), so
  the keys are `...mlp.experts.base_layer.lora_A.weight` (gate_up_proj) and
  `...mlp.experts.lora_A.weight` (down_proj);
* A is (r·E) x in and B is out x (r·E), interleaved differently: expert e's factors are
  A.reshape(E, r, in)[e] and B.reshape(out, r, E)[:, :, e];
* the adapted tensor is W[e] + s · B_e @ A_e with s = alpha / r (alpha / sqrt(r) with
  rsLoRA); dropout has no place (the update is on the weight, there is no per-layer
  input to drop), nor DoRA, PiSSA or fan-in/fan-out (peft refuses them too).

The forward builds W + ΔW for the whole stack (one `baddbmm`) and runs the wrapped
module with it in place of W (`torch.func.functional_call`), so whatever experts
implementation transformers picked sees an ordinary tensor; F.linear keeps that tensor
for backward (the estimator's `expert_lora` rows). The router is never adapted: it stays
frozen. Which tensors `target_parameters` may name is what the Arch's `Experts`
describes, on a live model and on a config alone alike, so the estimator's count is exact.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..arch import Arch, arch_of, set_submodule
from .base import AdapterLayer
from .plan import Plan


class TargetParametersError(ValueError):
    pass


def check_parameter_list(v):
    """Validator body of `target_parameters`: None, or a non-empty list of names."""
    if v is None:
        return v
    if not v or any(not isinstance(t, str) or not t.strip() for t in v):
        raise ValueError("must name at least one parameter, each a non-empty string (e.g. 'mlp.experts.gate_up_proj')")
    return [t.strip() for t in v]


# ---- which tensors ---------------------------------------------------------------------------

def expert_tensor_names(arch: Arch, num_layers: int) -> list[str]:
    """Full names of every 3-D expert tensor of a model, in module order (block, then
    the experts module's parameter order, which is also peft's nesting order)."""
    ex = arch.experts
    if ex is None:
        return []
    return [f"{arch.blocks_path}.{i}.{ex.path}.{p}" for i in range(num_layers) for p in ex.params]


def select_expert_tensors(arch: Arch, num_layers: int, targets: Sequence[str]) -> list[str]:
    """The expert tensors `targets` names (peft's rule: a name equal to the full
    parameter name or ending in `.<target>`), in module order; every target must name
    one, else TargetParametersError with the candidates."""
    ex = arch.experts
    if ex is None:
        raise TargetParametersError(
            f"method.target_parameters: this {arch.family} model has no mixture-of-experts tensors; "
            f"target_parameters adapts the 3-D expert tensors of MoE models (e.g. Mixtral, Qwen3-MoE). "
            f"Adapt linear layers with target_modules instead")
    names = expert_tensor_names(arch, num_layers)
    chosen, missing = set(), []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            missing.append(t)
        chosen.update(hits)
    if missing:
        cands = [f"{ex.path}.{p}" for p in ex.params] + list(ex.params)
        router = ex.router.rsplit(".", 1)[-1]
        hint = (f" (the router {ex.router} stays frozen)"
                if any(m.split(".")[-1] in (router, "weight") or ex.router in m for m in missing) else "")
        raise TargetParametersError(
            f"method.target_parameters: {', '.join(repr(m) for m in missing)} "
            f"name{'s' if len(missing) == 1 else ''} no expert tensor of this {arch.family} model{hint}; "
            f"candidates: {', '.join(cands)}")
    return [n for n in names if n in chosen]


def blocks_in(model: nn.Module, arch: Arch) -> int:
    return len(model.get_submodule(arch.blocks_path))


def expert_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    arch = arch_of(model)
    return select_expert_tensors(arch, blocks_in(model, arch), targets)


def expert_targets_in_dims(dims, targets: Sequence[str]) -> list[tuple[str, int, int, int]]:
    """(full name, E, out, in) of each expert tensor `targets` names in the model `dims` describes."""
    names = select_expert_tensors(dims.arch, dims.num_layers, targets)
    shapes = {path: (o, i) for path, o, i in dims.expert_tensors()}
    prefix = dims.arch.blocks_path + "."
    out = []
    for n in names:
        path = n[len(prefix):].split(".", 1)[1]
        o, i = shapes[path]
        out.append((n, dims.num_experts, o, i))
    return out


# ---- the layer -------------------------------------------------------------------------------

def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_e stacked E x out x r, A_e stacked E x r x in) from peft's A ((r·E) x in,
    expert-major rows: A_e = rows e·r..e·r+r-1) and B (out x (r·E), expert-minor
    columns: B_e = columns j·E + e)."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return b3, a3


def expert_delta(a: torch.Tensor, b: torch.Tensor, experts: int, scaling: float) -> torch.Tensor:
    """ΔW = s · B_e @ A_e for every expert, E x out x in."""
    b3, a3 = expert_factors(a, b, experts)
    return torch.bmm(b3, a3) * scaling


class ExpertLora(AdapterLayer):
    """LoRA on one parameter (`parameter_name`, E x out x in, or out x in as E = 1) of the
    wrapped module: the module runs with W + s · B_e A_e per expert in place of W."""

    def __init__(self, base: nn.Module, parameter_name: str, r: int, alpha: float, *,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__(base)
        self.parameter_name = parameter_name
        w = self.param()
        if w.dim() not in (2, 3):
            raise TargetParametersError(f"method.target_parameters: {parameter_name} is a {w.dim()}-D tensor; "
                                        f"only 2-D and 3-D tensors take a low-rank update")
        self.num_experts = int(w.shape[0]) if w.dim() == 3 else 1
        self.out_features, self.in_features = int(w.shape[-2]), int(w.shape[-1])
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dt = w.dtype if w.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=w.device, dtype=dt)
        self.lora_B = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=w.device, dtype=dt)
        self.init = init
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            else:
                raise TargetParametersError(f"method.init: {init!r} is not available for target_parameters "
                                            f"(use kaiming or gaussian)")
            nn.init.zeros_(self.lora_B.weight)

    def holder(self) -> nn.Module:
        """The module that owns the parameter (below any nested ExpertLora)."""
        m = self.base_layer
        while isinstance(m, ExpertLora):
            m = m.base_layer
        return m

    def param(self) -> torch.Tensor:
        return getattr(self.holder(), self.parameter_name)

    def delta_weight(self) -> torch.Tensor:
        w = self.param()
        d = expert_delta(self.lora_A.weight, self.lora_B.weight, self.num_experts, self.scaling)
        return d.reshape(w.shape)

    def adapted(self) -> torch.Tensor:
        """W + ΔW in W's dtype (peft casts the factors to it too), one fused op."""
        w = self.param()
        b3, a3 = expert_factors(self.lora_A.weight.to(w.dtype), self.lora_B.weight.to(w.dtype), self.num_experts)
        return torch.baddbmm(w.reshape(self.num_experts, *w.shape[-2:]), b3, a3,
                             alpha=self.scaling).reshape(w.shape)

    def forward(self, *args, **kwargs):
        return self.call_with({}, args, kwargs)

    def call_with(self, overrides: dict, args, kwargs):
        if not self.merged:
            overrides[self.parameter_name] = self.adapted()
        if isinstance(self.base_layer, ExpertLora):
            return self.base_layer.call_with(overrides, args, kwargs)
        if not overrides:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, overrides, args, kwargs)

    def _add_to_base(self, delta: torch.Tensor) -> None:
        w = self.param()
        w += delta.to(w.dtype)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, r={self.r}, experts={self.num_experts}"


# ---- injection -------------------------------------------------------------------------------

def inject_expert_lora(model: nn.Module, names: Sequence[str], ranks: dict, alphas: dict, *,
                       use_rslora: bool = False, init: str = "kaiming") -> dict[str, ExpertLora]:
    """Wrap each named parameter's module in an ExpertLora (per name its rank and
    alpha); tensors of one module nest in the module's parameter order, the first
    innermost, as peft does. Returns {parameter name: layer}."""
    by_module: dict[str, list[str]] = {}
    for n in names:
        mod, _, p = n.rpartition(".")
        by_module.setdefault(mod, []).append(p)
    out = {}
    for mod, params in by_module.items():
        order = [p for p, _ in model.get_submodule(mod).named_parameters(recurse=False)]
        for p in sorted(params, key=order.index):
            name = f"{mod}.{p}"
            layer = ExpertLora(model.get_submodule(mod), p, ranks[name], alphas[name],
                               use_rslora=use_rslora, init=init)
            set_submodule(model, mod, layer)
            out[name] = layer
    return out


def expert_lora_layers(model: nn.Module) -> list[tuple[str, ExpertLora]]:
    """(peft module key, layer) of every ExpertLora: the key is the module path with the
    nesting's `base_layer` infixes, as peft's state dict has it."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertLora)]


# ---- estimator -------------------------------------------------------------------------------

def count_expert_lora(dims, targets: Optional[Sequence[str]], rank_of) -> int:
    """r · E · (in + out) per adapted tensor; `rank_of(full name)` gives its rank."""
    if not targets:
        return 0
    return sum(rank_of(n) * e * (i + o) for n, e, o, i in expert_targets_in_dims(dims, targets))


def add_expert_lora_plan(plan: Plan, dims, targets: Optional[Sequence[str]], rank_of) -> Plan:
    """Mark each adapted expert tensor in its block's LayerPlan (`expert_lora`: block-relative
    path -> rank): the estimator keeps W + ΔW and the expert inputs for backward."""
    if not targets:
        return plan
    prefix = dims.arch.blocks_path + "."
    for n, *_ in expert_targets_in_dims(dims, targets):
        i, path = n[len(prefix):].split(".", 1)
        plan.layers[int(i)].expert_lora[path] = rank_of(n)
    return plan


# ---- peft export -----------------------------------------------------------------------------

def peft_parameter_list(model: nn.Module, chosen: Sequence[str]) -> list[str]:
    """`target_parameters` for adapter_config.json selecting exactly `chosen` under peft's
    suffix rule: the block-relative paths when they do, else the full names."""
    arch = arch_of(model)
    every = expert_tensor_names(arch, blocks_in(model, arch))
    rel = sorted({n.split(".", len(arch.blocks_path.split(".")) + 1)[-1] for n in chosen})
    if {n for n in every if any(n.endswith("." + t) for t in rel)} == set(chosen):
        return rel
    return sorted(chosen)


def expert_export(model: nn.Module) -> tuple[dict, dict[str, tuple[int, float]], list[str]]:
    """(peft tensors, {full parameter name: (rank, alpha)}, target_parameters)."""
    tensors, per_param = {}, {}
    for key, layer in expert_lora_layers(model):
        tensors[f"base_model.model.{key}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        tensors[f"base_model.model.{key}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
        full = key.replace(".base_layer", "") + "." + layer.parameter_name
        per_param[full] = (layer.r, float(layer.alpha))
    return tensors, per_param, (peft_parameter_list(model, list(per_param)) if per_param else [])
