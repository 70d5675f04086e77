"""What the weight-reparametrising methods share (LoHa, LoKr, VeRA, OFT): their
family, target resolution on the model and on its dims, strict loading of saved
tensors by name, and peft's `target_modules` for export.

These methods replace a frozen linear layer's weight W by W + ΔW(θ) (LoHa, LoKr,
VeRA) or by W·R(θ) (OFT) for a small θ; none of them trains LoRA's `A`/`B`
matrices, so their `family` is `reparam`, not `lora` (the Compare tab's subspace
similarity reads LoRA `A` matrices, and the peft LORA/IA3 importers do not apply).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import arch_of, set_submodule
from .base import AdapterLayer, freeze_all
from .lora import base_linear_names
from .plan import Plan, empty_plan, ranks_per_layer
from .targeting import peft_target_list, resolve_targets, resolve_targets_in_dims

FAMILY = "reparam"
PEFT_PREFIX = "base_model.model."


class ReparamLoadError(ValueError):
    pass


def target_names(model: nn.Module, target_modules, what: str) -> list[str]:
    """The plain nn.Linear layers `target_modules` selects (default: the architecture's
    LoRA targets, which are peft's defaults for these methods too)."""
    targets = target_modules or list(arch_of(model).default_lora_targets)
    names = resolve_targets(model, targets)
    bad = [n for n in names if type(model.get_submodule(n)) is not nn.Linear]
    if bad:
        raise ValueError(f"method.target_modules: {what} adapts plain torch Linear layers only; "
                         f"{bad[0]} of the {arch_of(model).family} model is a "
                         f"{type(model.get_submodule(bad[0])).__name__}")
    return names


def targets_in_dims(dims, target_modules, task: str):
    targets = target_modules or list(dims.arch.default_lora_targets)
    return resolve_targets_in_dims(dims, targets, task)


def wrap_targets(model: nn.Module, target_modules, what: str, seed: int,
                 make_layer: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Freeze the model and replace each target linear layer by `make_layer(name, layer)`,
    with torch's global generator seeded first so the adapter's initialisation repeats."""
    freeze_all(model)
    names = target_names(model, target_modules, what)
    torch.manual_seed(seed)
    for n in names:
        set_submodule(model, n, make_layer(n, model.get_submodule(n)))


def layers_of(model: nn.Module, cls) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def peft_targets(model: nn.Module, layers) -> list[str]:
    """target_modules for adapter_config.json selecting exactly the adapted layers."""
    return peft_target_list(base_linear_names(model), [n for n, _ in layers])


def own_name(key: str) -> str:
    """A saved key (`base_model.model.<path>.<param>`, optionally with peft's
    `.default` adapter name) as our parameter's name."""
    name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
    name = name.replace(".modules_to_save.", ".")
    return name[: -len(".default")] if name.endswith(".default") else name


def copy_named_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], error: type[Exception] = ValueError,
                       skip: Optional[set] = None) -> set[str]:
    """Copy saved tensors (peft keys or ours, see `own_name`) into the model's
    parameters: each key must name a parameter of the same shape, else `error`.
    Keys in `skip` are the caller's. Returns the names of the parameters written."""
    params = dict(model.named_parameters())
    loaded, unknown = set(), []
    with torch.no_grad():
        for key, value in tensors.items():
            if skip and key in skip:
                continue
            name = own_name(key)
            if name not in params:
                unknown.append(key)
                continue
            if params[name].shape != value.shape:
                raise error(f"tensor {key}: shape {tuple(value.shape)} does not fit "
                            f"{name} {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
            loaded.add(name)
    if unknown:
        raise error(f"adapter tensors match nothing in the model: {unknown[:5]}")
    return loaded


def load_by_name(model: nn.Module, tensors: dict[str, torch.Tensor], layer_cls,
                 skip: Optional[set] = None) -> None:
    """Copy saved tensors into the model's parameters strictly (`copy_named_tensors`),
    and every parameter of a `layer_cls` layer must get one. Keys in `skip` are the
    caller's (e.g. VeRA's shared projections)."""
    own = {f"{n}.{p}" for n, m in layers_of(model, layer_cls) for p, _ in m.named_parameters()
           if not p.startswith("base_layer.")}
    loaded = copy_named_tensors(model, tensors, ReparamLoadError, skip)
    unset = sorted(own - loaded)
    if unset:
        raise ReparamLoadError(f"adapter lacks tensors for {len(unset)} adapter parameters, e.g. {unset[:3]}")


def weight_saved_plan(dims, sizes: dict[str, int]) -> Plan:
    """The estimator's plan for adapters that keep their layer's input and a tensor
    of `sizes[name]` elements (independent of the tokens) for backward."""
    plan = empty_plan(dims)
    for i, d in ranks_per_layer(dims, sizes).items():
        plan.layers[i].weight_saved = dict(d)
    return plan


def delta_dtype(base: nn.Linear) -> torch.dtype:
    dt = base.weight.dtype
    return dt if dt.is_floating_point else torch.float32


def row_dropout(delta: torch.Tensor, p: float, rescale: bool) -> torch.Tensor:
    """Zero whole rows of ΔW with probability p (LyCORIS's rank dropout)."""
    keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(1e-12)
    return delta * keep[:, None]


class DenseDeltaLinear(AdapterLayer):
    """A linear layer whose update is a dense ΔW = `delta_weight()` built each forward
    (LoHa, LoKr): y = base(x) + x @ ΔWᵀ. In training, `module_dropout` skips the update
    for a step with that probability and `rank_dropout` zeroes rows of ΔW (rescaled by
    the kept fraction when `rank_dropout_scale`), as in LyCORIS. Merges additively."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                 rank_dropout_scale: bool):
        super().__init__(base)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or (self.training and self.module_dropout and float(torch.rand(1)) <= self.module_dropout):
            return y
        delta = self.delta_weight()
        if self.training and self.rank_dropout:
            delta = row_dropout(delta, self.rank_dropout, rescale=self.rank_dropout_scale)
        return y + F.linear(x.to(delta.dtype), delta).to(y.dtype)
