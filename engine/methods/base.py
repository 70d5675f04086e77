"""What every PEFT method provides: a validated config and a function that turns a
frozen base model into one with trainable adapter parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..arch import set_submodule

if TYPE_CHECKING:
    from ..dims import ModelDims
    from .plan import Plan


class MethodConfig(BaseModel):
    """Base of every method's config: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    name: str


@dataclass
class ApplyContext:
    """What a method may need to know beyond the model."""

    task: str                     # "classification" | "causal_lm"
    seed: int = 0
    tokenizer: Any = None         # for prompt-init from text
    dtype: Optional[torch.dtype] = None   # the run dtype (engine.precision.run_dtype); None: fp32


@dataclass
class PeftExport:
    """peft's on-disk form of an adapter: adapter_config.json contents and the
    tensors of adapter_model.safetensors."""

    adapter_config: dict
    tensors: dict


FAMILIES = ("lora", "ia3", "adapter", "prompt", "selective", "reparam")


class Family:
    """The family names as constants, for code outside engine/methods that asks a spec's family."""

    LORA, IA3, ADAPTER, PROMPT, SELECTIVE, REPARAM = FAMILIES


@dataclass
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[nn.Module, MethodConfig, ApplyContext], None]
    paper: str
    summary: str
    trains: str
    mergeable: bool = False
    merge: Optional[Callable[[nn.Module], None]] = None
    peft_export: Optional[Callable[[nn.Module, MethodConfig, ApplyContext], PeftExport]] = None
    trains_head: bool = True      # classification head trainable (False for `full`, which trains it anyway)
    # Optional training hooks (AdaLoRA's rank allocation, regularizers):
    extra_loss: Optional[Callable[[nn.Module], "torch.Tensor"]] = None          # added to the task loss
    after_backward: Optional[Callable[[nn.Module, int, int], None]] = None      # (model, step, total) before opt.step
    after_step: Optional[Callable[[nn.Module, int, int], None]] = None          # (model, step, total) after opt.step
    # Exact trainable-parameter count from the model config alone (for the estimator):
    count_trainable: Optional[Callable[["ModelDims", MethodConfig, str], int]] = None   # (dims, cfg, task)
    # Load weights saved by `engine.adapters` back into a model with the method applied (default: by name)
    load_state: Optional[Callable[[nn.Module, dict], None]] = None
    # What the rest of the product asks of a method instead of testing its name:
    family: str = "selective"     # "lora" | "ia3" | "adapter" | "prompt" | "selective" | "reparam" (charts, loaders)
    adds_params: bool = True      # False: trains parameters the base model already has (full, top_k, bitfit, ...)
    quantizes_base: bool = False  # the frozen base is stored quantized (QLoRA's NF4)
    trains_base_weights: bool = False   # the block linear weights themselves train (full, top_k): never quantized
    # (method config, run dtype) -> an engine.loading.ModuleTransform that replaces modules while the
    # checkpoint streams in (QLoRA quantizes each block linear as its weight arrives); None: load as is
    load_transform: Optional[Callable[[MethodConfig, "torch.dtype"], Any]] = None
    # What each block trains, for the estimator's saved-activation model (engine.methods.plan.Plan):
    plan: Optional[Callable[["ModelDims", MethodConfig, str], "Plan"]] = None   # (dims, cfg, task)
    # The learning rate of a run whose config gives none (training.learning_rate left out),
    # measured on the Launch form's first run: bench/default_lr.py, bench/RESULTS-default-lr.md
    default_lr: Optional[float] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.mergeable and self.merge is None:
            raise ValueError(f"method {self.name!r}: mergeable methods need a merge function")


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable), counting each shared tensor once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if hasattr(p, "quant_numel"):
            n = p.quant_numel
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


class WrapsBaseLayer(nn.Module):
    """A module that wraps a frozen layer as `self.base_layer` (adapter layers, bottleneck
    wrappers) and still looks like it to code that reads `.weight` / `.bias`
    (transformers' init and dtype checks, tied-weight lookups)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias


class AdapterLayer(WrapsBaseLayer):
    """The protocol of a mergeable adapter layer (LoRA, DoRA, AdaLoRA, IA³, QLoRA,
    LoHa, LoKr, VeRA, OFT): a frozen `base_layer` plus a trainable update that
    `merge()` folds into the base weight and `unmerge()` takes out again; `merged`
    says which state it is in. (After peft's BaseTunerLayer.)

    By default the update is additive: `merge()` adds `delta_weight()` (out x in) to
    the base weight in its dtype, transposed when `fan_in_fan_out` (GPT-2's Conv1D
    stores in x out), and `unmerge()` subtracts it. Layers with other merge math
    (OFT rotates, IA³ scales, DoRA renormalises) override both."""

    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight() or override merge()")

    def _add_to_base(self, delta: torch.Tensor) -> None:
        w = self.base_layer.weight
        w += (delta.T if self.fan_in_fan_out else delta).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    def unwrap_merged(self) -> nn.Module:
        """Merge and return the plain base layer (to put back in the model)."""
        self.merge()
        return self.base_layer


class QuantizedLayer(nn.Module):
    """A frozen layer kept in a compressed form (QLoRA's NF4); `to_float_layer()`
    gives back a plain full-precision layer with the dequantized weight."""

    def to_float_layer(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement to_float_layer()")


def merge_and_unload(model: nn.Module) -> None:
    """Fold every adapter layer into its base weight and put the plain layer back;
    quantized layers come back dequantized. Innermost first, so an adapter over a
    quantized layer merges into the dequantized weight. The one merge function of
    every mergeable method (for methods that train existing weights it changes nothing)."""
    wrapped = [(n, m) for n, m in model.named_modules() if n and isinstance(m, (AdapterLayer, QuantizedLayer))]
    for name, layer in sorted(wrapped, key=lambda t: -t[0].count(".")):
        plain = layer.unwrap_merged() if isinstance(layer, AdapterLayer) else layer.to_float_layer()
        set_submodule(model, name, plain)
