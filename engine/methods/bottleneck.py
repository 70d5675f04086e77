"""Bottleneck adapters, serial (Houlsby) and parallel (He et al.): the layers and
insertion code that the houlsby, parallel_adapter, mam and s4 methods share.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
arXiv:1902.00751 — a small bottleneck network (down-projection, nonlinearity,
up-projection, residual) inserted after the attention output projection and
after the FFN output projection of every block, initialised near the identity;
the layer norms train too.

He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", ICLR 2022, arXiv:2110.04366 — the parallel adapter: the same
bottleneck computed from the sublayer's *input* and added, times a scale s, to
the sublayer's output (h <- h + s * f(x W_down) W_up), beside the FFN (best) or
the attention.

Where things go (block-relative, see engine.arch):
- serial: wraps the attention output projection (`o_proj` / `attention.output.dense`)
  and the FFN output projection (`down_proj` / `output.dense`): y -> y + A(y),
  before the residual add (and, in BERT, before dropout + LayerNorm of the residual).
- parallel, Llama: wraps `mlp` (x -> mlp(x) + s A(x)) and/or `self_attn`.
- parallel, BERT: wraps `output` / `attention.output`, whose forward is
  LayerNorm(dropout(dense(h)) + x) with x the sublayer input; adding s A(x) to x
  there is exactly LayerNorm(FFN(x) + s A(x) + x).

Neither kind can be merged into the base weights (the nonlinearity sits in between).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..arch import Arch, arch_of, blocks, set_submodule
from .base import MethodConfig, WrapsBaseLayer
from .plan import Plan, empty_plan, layers_subset

Activation = Literal["relu", "gelu", "tanh", "silu"]
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BottleneckSize(MethodConfig):
    """Shared fields: the bottleneck width as a size or a reduction factor, which layers."""

    bottleneck_size: Optional[int] = Field(None, gt=0, le=65536, description="width of the bottleneck")
    reduction_factor: Optional[float] = Field(
        None, gt=0, description="bottleneck = hidden_size / reduction_factor (default 16 when no size is given)")
    activation: Activation = "relu"
    layers: Optional[list[int]] = Field(None, description="block indices to adapt (0-based); default all")

    @model_validator(mode="after")
    def _one_size(self):
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError("give method.bottleneck_size or method.reduction_factor, not both")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("method.layers: must name at least one layer")
            if any(i < 0 for i in self.layers):
                raise ValueError("method.layers: layer indices are 0-based and non-negative")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError("method.layers: duplicate layer index")
        return self


def bottleneck_width(hidden: int, size: Optional[int], reduction: Optional[float]) -> int:
    if size is not None:
        return size
    return max(1, int(hidden // (reduction if reduction is not None else 16)))


def chosen_layers(num_layers: int, layers: Optional[list[int]], field: str = "method.layers") -> list[int]:
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise ValueError(f"{field}: {bad} out of range; this model has {num_layers} layers (0..{num_layers - 1})")
    return sorted(layers)


class Bottleneck(nn.Module):
    """x -> up(act(down(x))): the adapter body, without the residual."""

    def __init__(self, dim: int, width: int, activation: str, *, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, width, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))

    @torch.no_grad()
    def init_near_identity(self, std: float) -> None:
        """Houlsby: small truncated-normal weights, zero biases, so x + A(x) ~ x."""
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)

    @torch.no_grad()
    def init_zero_output(self) -> None:
        """He et al. (LoRA-style): random down-projection, zero up-projection: A(x) = 0 at start."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


def bottleneck_params(dim: int, width: int) -> int:
    return 2 * dim * width + width + dim


class SerialAdapter(WrapsBaseLayer):
    """A projection followed by a residual bottleneck adapter: y = base(x); y + adapter(y)."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__(base)
        self.adapter = adapter

    def forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        return y + self.adapter(y)


class ParallelBeside(WrapsBaseLayer):
    """A sublayer whose output is a tensor (Llama mlp) or a tuple whose first item is
    the output (Llama self_attn): out + scale * adapter(input)."""

    def __init__(self, base: nn.Module, adapter: Bottleneck, scale: float):
        super().__init__(base)
        self.adapter = adapter
        self.scale = scale

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = self.base_layer(*args, **kwargs)
        extra = self.scale * self.adapter(x)
        if isinstance(out, tuple):
            return (out[0] + extra,) + tuple(out[1:])
        return out + extra


class ParallelIntoResidual(WrapsBaseLayer):
    """BERT's BertOutput / BertSelfOutput: forward(h, x) = LayerNorm(dropout(dense(h)) + x)
    with x the sublayer input; the parallel adapter adds scale * adapter(x) to the residual."""

    def __init__(self, base: nn.Module, adapter: Bottleneck, scale: float):
        super().__init__(base)
        self.adapter = adapter
        self.scale = scale

    def forward(self, hidden_states, input_tensor):
        return self.base_layer(hidden_states, input_tensor + self.scale * self.adapter(input_tensor))


def _new_bottleneck(model: nn.Module, like: nn.Module, width: int, activation: str) -> Bottleneck:
    p = next(like.parameters())
    return Bottleneck(model.config.hidden_size, width, activation, device=p.device, dtype=p.dtype)


def serial_sites(arch: Arch, placement: str) -> list[str]:
    """Block-relative projections after which a serial adapter goes."""
    return {"attn": [arch.o], "ffn": [arch.ffn_out], "both": [arch.o, arch.ffn_out]}[placement]


def layer_norm_paths(arch: Arch, placement: str = "both") -> list[str]:
    """The norms of a block that Houlsby trains (those around the adapted sublayers):
    the attention sublayer's norm, the FFN sublayer's norm, or both."""
    return arch.sublayer_norms(placement)


def add_serial_adapters(model: nn.Module, width: int, activation: str, layers: list[int], placement: str,
                        init_std: float, train_layernorm: bool, *,
                        make_adapter: Optional[Callable[[nn.Module], nn.Module]] = None,
                        wrapper: Callable[[nn.Module, nn.Module], nn.Module] = SerialAdapter,
                        norms: str = "both") -> None:
    """Insert serial adapters into `layers` (no freezing: callers freeze first). By default
    Houlsby's bottleneck with its near-identity init; `make_adapter(base)` builds another
    adapter body (Compacter's PHM bottleneck), `wrapper(base, adapter)` another wrapper
    (UniPELT's gated one); `norms` says which block norms train with `train_layernorm`."""
    arch = arch_of(model)
    for i in layers:
        block = blocks(model)[i]
        for site in serial_sites(arch, placement):
            base = block.get_submodule(site)
            if make_adapter is None:
                ad = _new_bottleneck(model, base, width, activation)
                ad.init_near_identity(init_std)
            else:
                ad = make_adapter(base)
            set_submodule(block, site, wrapper(base, ad))
        if train_layernorm:
            for path in layer_norm_paths(arch, norms):
                for p in block.get_submodule(path).parameters():
                    p.requires_grad_(True)


def parallel_sites(arch: Arch, placement: str) -> list[str]:
    if arch.parallel_sites is None:
        raise ValueError(f"method: parallel adapters are not implemented for the {arch.family} architecture")
    attn, ffn = arch.parallel_sites      # self_attn, mlp (beside) / attention.output, output (into the residual)
    return {"attn": [attn], "ffn": [ffn], "both": [attn, ffn]}[placement]


def add_parallel_adapters(model: nn.Module, width: int, activation: str, layers: list[int], placement: str,
                          scale: float) -> None:
    arch = arch_of(model)
    wrapper = ParallelIntoResidual if arch.parallel_into_residual else ParallelBeside
    for i in layers:
        block = blocks(model)[i]
        for site in parallel_sites(arch, placement):
            base = block.get_submodule(site)
            ad = _new_bottleneck(model, base, width, activation)
            ad.init_zero_output()
            set_submodule(block, site, wrapper(base, ad, scale))


def check_family(model: nn.Module, method: str, parallel: bool = True) -> Arch:
    """The model's architecture, if bottleneck adapters fit it: the sublayer norms are
    known and (`parallel`) the modules a parallel adapter wraps."""
    arch = arch_of(model)
    missing = [] if arch.attn_norm and arch.ffn_norm else ["its sublayer norms"]
    if not arch.bottleneck_adapters:
        missing.append("bottleneck adapters checked by the family battery")
    if parallel and arch.parallel_sites is None:
        missing.append("the attention / FFN modules a parallel adapter wraps")
    if not arch.ffn_out:
        missing.append("a dense FFN output projection (mixture-of-experts blocks have none)")
    if missing:
        raise ValueError(f"method.name: {method} does not support {arch.family} models: the architecture "
                         f"description lacks {' and '.join(missing)}")
    return arch


def layernorm_params_per_block(dims, n_norms: int = 2) -> int:
    """Parameters of `n_norms` sublayer norms of a block."""
    return n_norms * dims.norm_params()


def sublayer_norm_params(dims, layers, placement: str = "both") -> int:
    """Parameters of the sublayer norms (`placement`) of `layers` (ModernBERT's block 0
    has no attention norm)."""
    n = len(dims.arch.sublayer_norms(placement)) * dims.norm_params() * len(layers)
    if dims.arch.first_attn_norm_identity and 0 in layers and placement in ("attn", "both"):
        n -= dims.norm_params()
    return n


def adapter_plan(dims, cfg: BottleneckSize, kind: str, placement: str) -> Plan:
    """Bottleneck adapters ("serial" | "parallel") at the placement's sites of the chosen blocks."""
    width = bottleneck_width(dims.hidden_size, cfg.bottleneck_size, cfg.reduction_factor)
    sites = ["attn", "ffn"] if placement == "both" else [placement]
    plan = empty_plan(dims)
    for i in layers_subset(dims, cfg.layers):
        plan.layers[i].adapters = [(kind, s, width) for s in sites]
    return plan
