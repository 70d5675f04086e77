"""UniPELT: LoRA, prefix tuning and a bottleneck adapter in every block, each gated.

Mao, Mathias, Hou, Almahairi, Ma, Han, Yih & Khabsa 2022, "UniPELT: A Unified
Framework for Parameter-Efficient Language Model Tuning", ACL 2022, arXiv:2110.07577.

Each sub-method is the engine's own, with a learned gate G = sigmoid(W_G x + b_G)
in (0, 1) that scales its contribution; the gate reads the input of the part it
gates, so a sub-module can be switched off for some inputs and on for others.
Pooling: on encoders (BERT) as in the paper, the gate is averaged over the
sequence (over the real tokens, by the attention mask), one value per example and
sub-module. On causal decoders a sequence average would let every position see the
tokens after it, so there the LoRA and adapter gates are per token, and the prefix
gate (one value for all queries, since it scales the shared prefix keys) is read
from the first real token, the one token every query sees; cached generation then
gives exactly the uncached outputs. A causal first token depends on nothing after
it, so when every sequence starts with the same token (a BOS) that gate is in
effect a learned constant per layer; it varies with the input only where the
first token does (packed rows, prompts without BOS).

- LoRA (engine.methods.lora) on the query and value projections (the paper's
  targets; `target_modules` to change): y = W x + G_L(x) * s * B A x, with G_L
  read from the projection's input.
- Prefix tuning (engine.methods.prefix, with its MLP reparameterisation): the
  prefix keys and values P_K, P_V of a block are multiplied by G_P, read from
  the attention sublayer's input; the real tokens' keys and values are unchanged.
  During generation the gate is the one of the prompt (the first forward).
- A serial bottleneck adapter after the FFN (engine.methods.bottleneck, Houlsby
  layer at Pfeiffer's placement, as in the paper): h + G_A(h) * A(h), with G_A read
  from the FFN output h.

Paper sizes: LoRA r = 8, prefix length 10, adapter bottleneck = hidden / 16.
Each part can be turned off (`lora`, `prefix`, `adapter`). Not mergeable (the gates
depend on the input); no peft format (peft has no UniPELT): saved as our own file.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..arch import arch_of
from .base import ApplyContext, MethodConfig, MethodSpec, freeze_all
from .bottleneck import (Activation, SerialAdapter, add_serial_adapters, bottleneck_params, bottleneck_width,
                         check_family)
from .lora import LoraLinear, default_targets, inject_lora
from .plan import Plan, empty_plan, ranks_per_layer
from .prefix import add_prefix_groups, attention_module, check_prefix_family, count_prefix_group, prefix_bank
from .prompts import backbone, get_cache
from .targeting import check_target_list, linear_like, resolve_targets, resolve_targets_in_dims

GATE_ATTR = "studio_prefix_gate"


class UniPELTConfig(MethodConfig):
    name: Literal["unipelt"] = "unipelt"
    lora: bool = Field(True, description="gated LoRA on the attention projections")
    r: int = Field(8, gt=0, le=4096, description="LoRA rank (paper: 8)")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: scale = alpha / r")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str, None] = Field(
        None, description="LoRA targets: module name suffixes or a regex; default query and value")
    prefix: bool = Field(True, description="gated prefix tuning")
    num_virtual_tokens: int = Field(10, gt=0, le=4096, description="prefix length per layer (paper: 10)")
    prefix_projection: bool = Field(True, description="MLP reparameterisation of the prefix during training")
    prefix_hidden_size: Optional[int] = Field(None, gt=0, le=65536, description="prefix MLP width")
    adapter: bool = Field(True, description="gated bottleneck adapter after the FFN")
    bottleneck_size: Optional[int] = Field(None, gt=0, le=65536, description="adapter bottleneck width")
    reduction_factor: Optional[float] = Field(
        None, gt=0, description="adapter bottleneck = hidden_size / reduction_factor (default 16)")
    activation: Activation = "relu"
    init_std: float = Field(1e-2, gt=0, le=1.0, description="std of the adapter's near-identity initialisation")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)

    @model_validator(mode="after")
    def _something(self):
        if not (self.lora or self.prefix or self.adapter):
            raise ValueError("method.lora, method.prefix, method.adapter: turn on at least one sub-module")
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError("give method.bottleneck_size or method.reduction_factor, not both")
        return self


class GateInput:
    """The current batch's 2-D attention mask, recorded by a pre-hook on the backbone so
    that pooled gates average over the real tokens only (not a module: no parameters)."""

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None


class Gate(nn.Module):
    """sigmoid(W x + b) from x [batch, seq, dim], pooled by `mode`: "mean" over the real
    tokens ([batch, 1, 1], encoders), "token" (no pooling: [batch, seq, 1], decoders) or
    "first" real token ([batch, 1, 1], the decoders' prefix gate)."""

    def __init__(self, dim: int, mode: str, inputs: GateInput, *, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(dim, 1, device=device, dtype=dtype)
        self.mode = mode
        self._inputs = [inputs]        # a list: shared, not a submodule

    def _mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        m = self._inputs[0].mask
        b, s = x.shape[0], x.shape[1]
        if m is None or m.dim() != 2 or m.shape[0] != b or m.shape[1] < s:
            return None
        return m[:, -s:].to(x.dtype).unsqueeze(-1)                         # [batch, seq, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.linear(x.to(self.linear.weight.dtype)))     # [batch, seq, 1]
        if self.mode == "token":
            return g
        m = self._mask(g)
        if self.mode == "first":
            if m is None:
                return g[:, :1]
            first = m.squeeze(-1).argmax(dim=1)                             # first real position
            return g[torch.arange(g.shape[0], device=g.device), first].unsqueeze(1)
        if m is None:
            return g.mean(dim=1, keepdim=True)
        return (g * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1)


def record_mask_hook(inputs: GateInput):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("attention_mask")
        inputs.mask = mask if isinstance(mask, torch.Tensor) else None
        return None
    return hook


def gate_modes(model: nn.Module) -> tuple[str, str]:
    """(mode of the LoRA and adapter gates, mode of the prefix gate)."""
    decoder = arch_of(model).is_decoder or getattr(model.config, "is_decoder", False)
    return ("token", "first") if decoder else ("mean", "mean")


class GatedLoraLinear(LoraLinear):
    """LoRA whose update is scaled by an input-dependent gate: y = W x + G_L(x) s B A x.
    The gate makes the update depend on the input, so it cannot be merged."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, *, gate_mode: str,
                 gate_inputs: GateInput, **kw):
        super().__init__(base, r, alpha, dropout, **kw)
        self.gate = Gate(self.lora_A.in_features, gate_mode, gate_inputs, device=self.lora_A.weight.device,
                         dtype=self.lora_A.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        dt = self.lora_A.weight.dtype
        xc = x if x.dtype == dt else x.to(dt)
        # G * B(a) = B(G * a): gating the r-wide activation keeps only r-wide tensors for backward
        a = self.lora_A(self.lora_dropout(xc)) * self.scaling
        return y + self.lora_B(self.gate(xc) * a).to(y.dtype)

    def merge(self) -> None:
        raise ValueError("method.name: unipelt's gated LoRA depends on the input and cannot be merged")

    unmerge = merge


class GatedSerialAdapter(SerialAdapter):
    """y = base(x); y + G_A(y) * adapter(y)."""

    def __init__(self, base: nn.Module, adapter: nn.Module, gate_mode: str, gate_inputs: GateInput):
        super().__init__(base, adapter)
        w = adapter.down.weight
        self.gate = Gate(adapter.down.in_features, gate_mode, gate_inputs, device=w.device, dtype=w.dtype)

    def forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        ad, g = self.adapter, self.gate(y)
        # G * up(h) = W_up (G * h) + G * b_up: the gate meets the bottleneck-wide h, so backward
        # keeps bottleneck-wide tensors rather than another hidden-wide one
        h = ad.act(ad.down(y))
        return y + F.linear(g * h, ad.up.weight) + g * ad.up.bias


def make_prefix_gate_hook(layer: int):
    """A forward pre-hook on a block's attention: on the first forward (the cache holds only
    the prefix), multiply this layer's prefix keys and values by G_P(attention input)."""

    def hook(attn: nn.Module, args: tuple, kwargs: dict):
        past = get_cache(kwargs)
        if past is None:
            return None
        past = getattr(past, "self_attention_cache", past)
        slots = attn._studio_prefix_slots
        entry = past.layers[layer]
        if entry.get_seq_length() != slots:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        g = getattr(attn, GATE_ATTR)(hidden).to(entry.keys.dtype).view(-1, 1, 1, 1)   # [batch, 1, 1, 1]
        entry.keys = entry.keys * g
        entry.values = entry.values * g
        return None

    return hook


def add_prefix_gates(model: nn.Module, mode: str, inputs: GateInput) -> None:
    slots = prefix_bank(model).slots
    hidden = model.config.hidden_size
    w = model.get_input_embeddings().weight
    for i in range(model.config.num_hidden_layers):
        attn = attention_module(model, i)
        setattr(attn, GATE_ATTR, Gate(hidden, mode, inputs, device=w.device, dtype=w.dtype))
        attn._studio_prefix_slots = slots
        attn.register_forward_pre_hook(make_prefix_gate_hook(i), with_kwargs=True)


def adapter_width(hidden: int, cfg: UniPELTConfig) -> int:
    return bottleneck_width(hidden, cfg.bottleneck_size, cfg.reduction_factor)


def apply_unipelt(model: nn.Module, cfg: UniPELTConfig, ctx: ApplyContext) -> None:
    check_family(model, "unipelt", parallel=False)
    if cfg.prefix:
        check_prefix_family(model, "unipelt")
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    inputs = GateInput()
    backbone(model).register_forward_pre_hook(record_mask_hook(inputs), with_kwargs=True)
    mode, prefix_mode = gate_modes(model)
    if cfg.lora:
        names = resolve_targets(model, cfg.target_modules or default_targets(model), want=linear_like)
        inject_lora(model, names, cfg.r, cfg.alpha, cfg.lora_dropout, layer_cls=GatedLoraLinear, gate_mode=mode,
                    gate_inputs=inputs)
    if cfg.prefix:
        add_prefix_groups(model, [(list(range(n_layers)), cfg.num_virtual_tokens)], cfg.prefix_projection,
                          cfg.prefix_hidden_size)
        add_prefix_gates(model, prefix_mode, inputs)
    if cfg.adapter:
        add_serial_adapters(model, adapter_width(hidden, cfg), cfg.activation, list(range(n_layers)), "ffn",
                            cfg.init_std, False,
                            wrapper=lambda base, ad: GatedSerialAdapter(base, ad, mode, inputs))


def lora_targets_in_dims(dims, cfg: UniPELTConfig, task: str):
    return resolve_targets_in_dims(dims, cfg.target_modules or list(dims.arch.default_lora_targets), task)


def count_unipelt(dims, cfg: UniPELTConfig, task: str) -> int:
    h, total = dims.hidden_size, 0
    if cfg.lora:
        for lin in lora_targets_in_dims(dims, cfg, task):
            total += cfg.r * (lin.in_features + lin.out_features) + lin.in_features + 1     # A, B, gate
    if cfg.prefix:
        total += count_prefix_group(dims, dims.num_layers, cfg.num_virtual_tokens, cfg.prefix_projection,
                                    cfg.prefix_hidden_size)
        total += dims.num_layers * (h + 1)                                                # G_P per block
    if cfg.adapter:
        total += dims.num_layers * (bottleneck_params(h, adapter_width(h, cfg)) + h + 1)  # adapter + G_A
    return total


def plan_unipelt(dims, cfg: UniPELTConfig, task: str) -> Plan:
    """LoRA on the targets, the prefix and a serial FFN adapter in every block (the gates'
    own activations are one value per token and are left out)."""
    plan = empty_plan(dims)
    if cfg.lora:
        ranks = {lin.name: cfg.r for lin in lora_targets_in_dims(dims, cfg, task)}
        for i, d in ranks_per_layer(dims, ranks).items():
            plan.layers[i].lora = {p: (r, float(cfg.lora_dropout)) for p, r in d.items()}
    for lp in plan.layers:
        if cfg.prefix:
            lp.prefix = int(cfg.num_virtual_tokens)
        if cfg.adapter:
            lp.adapters = [("serial", "ffn", adapter_width(dims.hidden_size, cfg))]
    return plan


SPEC = MethodSpec(
    name="unipelt", config_cls=UniPELTConfig, apply=apply_unipelt,
    paper="Mao et al. 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning "
          "(arXiv:2110.07577)",
    summary="LoRA, prefix tuning and a bottleneck adapter in every block, each scaled by a learned gate "
            "computed from its input.",
    trains="LoRA A/B on query and value, the prefixes (with their MLP), FFN adapters, and one gate per sub-module",
    count_trainable=count_unipelt, family="adapter", plan=plan_unipelt,
    default_lr=0.001,   # bench/RESULTS-default-lr.md
)
