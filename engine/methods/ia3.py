"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022,
arXiv:2205.05638.

Learned vectors rescale the keys, the values and the FFN intermediate activation:
for an attention target y = l ⊙ base(x) (l of size out, scaling the bias too);
for a feed-forward target y = base(l ⊙ x) (l of size in: the FFN's intermediate
activation entering its output projection). Vectors start at one, so training
starts from the base model. Mergeable (rows or columns of W scaled by l).

Defaults follow peft: llama k_proj, v_proj, down_proj (down_proj feed-forward);
BERT key, value, output.dense (output.dense feed-forward). With peft's suffix
rule `output.dense` also selects each attention block's `attention.output.dense`,
as in peft; name `attention.output.dense` or use a regex to be more precise.
Exported as peft IA3 (`ia3_l` tensors of shape (out, 1) or (1, in)).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from ..arch import arch_of, set_submodule
from .base import AdapterLayer, ApplyContext, MethodConfig, MethodSpec, PeftExport, freeze_all, merge_and_unload
from .plan import Plan, empty_plan
from .lora import base_linear_names, layer_features
from .targeting import (check_target_list, TargetModulesError, is_conv1d, linear_like, peft_target_list, resolve_targets,
                        resolve_targets_in_dims, select_names)


class IA3Config(MethodConfig):
    name: Literal["ia3"] = "ia3"
    target_modules: Union[list[str], str, None] = Field(
        None, description="modules to rescale; default per architecture (keys, values, FFN output projection)")
    feedforward_modules: Union[list[str], str, None] = Field(
        None, description="which targets scale their input (FFN) instead of their output")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)


class IA3Linear(AdapterLayer):
    """y = l * base(x) (attention targets) or y = base(l * x) (feed-forward targets)."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__(base)
        self.is_feedforward = feedforward
        self.fan_in_fan_out = is_conv1d(base)
        fin, fout = layer_features(base)
        shape = (1, fin) if feedforward else (fout, 1)
        w = base.weight
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype if w.is_floating_point()
                                             else torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        l = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x * l).to(x.dtype))
        y = self.base_layer(x)
        return (y * l).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w, l = self.base_layer.weight, self.ia3_l
        # W is (out x in) for Linear, (in x out) for Conv1D
        if self.is_feedforward:
            w.mul_((l.T if self.fan_in_fan_out else l).to(w.dtype))
        else:
            w.mul_((l.T if self.fan_in_fan_out else l).to(w.dtype))
            if self.base_layer.bias is not None:
                self.base_layer.bias.mul_(l.flatten().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w, l = self.base_layer.weight, self.ia3_l
        w.div_((l.T if self.fan_in_fan_out else l).to(w.dtype))
        if not self.is_feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.div_(l.flatten().to(w.dtype))
        self.merged = False


def default_targets(arch) -> tuple[list[str], list[str]]:
    """The architecture's IA3 targets (keys, values, FFN output) and which of them scale their input."""
    if not arch.ia3_targets:
        raise ValueError(f"method.target_modules: no ia3 default for {arch.family!r}; name the modules")
    return list(arch.ia3_targets), list(arch.ia3_feedforward)


def targets_and_ff(cfg: IA3Config, arch) -> tuple:
    if cfg.target_modules is None:
        t, ff = default_targets(arch)
        return t, (cfg.feedforward_modules if cfg.feedforward_modules is not None else ff)
    return cfg.target_modules, (cfg.feedforward_modules or [])


def feedforward_subset(names: list[str], ff, arch) -> set[str]:
    if not ff:
        return set()
    try:
        chosen = set(select_names(names, ff, arch))
    except TargetModulesError as e:
        raise TargetModulesError(str(e).replace("method.target_modules", "method.feedforward_modules")) from None
    return chosen


def apply_ia3(model: nn.Module, cfg: IA3Config, ctx: ApplyContext) -> None:
    freeze_all(model)
    arch = arch_of(model)
    targets, ff = targets_and_ff(cfg, arch)
    names = resolve_targets(model, targets, want=linear_like)
    ff_names = feedforward_subset(names, ff, arch)
    for n in names:
        set_submodule(model, n, IA3Linear(model.get_submodule(n), n in ff_names))


def count_ia3_trainable(dims, cfg: IA3Config, task: str) -> int:
    targets, ff = targets_and_ff(cfg, dims.arch)
    layers = resolve_targets_in_dims(dims, targets, task)
    ff_names = feedforward_subset([l.name for l in layers], ff, dims.arch)
    return sum(l.in_features if l.name in ff_names else l.out_features for l in layers)


def ia3_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def export_ia3_peft(model: nn.Module, cfg: IA3Config, ctx: ApplyContext) -> PeftExport:
    layers = ia3_layers(model)
    if not layers:
        raise ValueError("the model has no IA3 layers to export")
    all_names = base_linear_names(model)
    chosen = [n for n, _ in layers]
    ff = [n for n, l in layers if l.is_feedforward]
    target_list = peft_target_list(all_names, chosen)
    ff_list = peft_ff_list(chosen, ff, target_list)
    if not set(ff_list) <= set(target_list):
        target_list, ff_list = sorted(chosen), sorted(ff)
    tensors = {f"base_model.model.{n}.ia3_l": l.ia3_l.detach().contiguous() for n, l in layers}
    config = {
        "peft_type": "IA3",
        "target_modules": target_list,
        "feedforward_modules": ff_list,
        "fan_in_fan_out": any(l.fan_in_fan_out for _, l in layers),
        "init_ia3_weights": True,
        "inference_mode": True,
    }
    return PeftExport(adapter_config=config, tensors=tensors)


def peft_ff_list(chosen: list[str], ff: list[str], target_list: list[str]) -> list[str]:
    """feedforward_modules for peft, which tests `name.endswith(entry)` and wants
    the entries to be among target_modules: the short names if they single out
    exactly the feed-forward targets, else full names (then target_modules must be
    full names too; the caller's target_list is reused when it already is)."""
    ff_set = set(ff)
    shorts = sorted({n.rsplit(".", 1)[-1] for n in ff})
    if set(target_list) >= set(shorts) and {n for n in chosen if any(n.endswith(s) for s in shorts)} == ff_set:
        return shorts
    return sorted(ff)


def plan_ia3(dims, cfg: IA3Config, task: str) -> Plan:
    """Keys, values and (unless feedforward_modules is an empty list) the FFN input scaled in every block."""
    plan = empty_plan(dims)
    ff = cfg.feedforward_modules
    for lp in plan.layers:
        lp.ia3 = {"k", "v", "ff"} if ff is None or ff else {"k", "v"}
    return plan


SPEC = MethodSpec(
    name="ia3", config_cls=IA3Config, apply=apply_ia3,
    paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
          "Learning (arXiv:2205.05638)",
    summary="Learned vectors rescale keys, values and the FFN intermediate activation; mergeable.",
    trains="one scaling vector per target layer",
    mergeable=True, merge=merge_and_unload, peft_export=export_ia3_peft, count_trainable=count_ia3_trainable,
    family="ia3", plan=plan_ia3,
    default_lr=0.1,   # bench/RESULTS-default-lr.md
)
