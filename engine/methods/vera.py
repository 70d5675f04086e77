"""VeRA: Vector-based Random Matrix Adaptation.

Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix Adaptation",
ICLR 2024, arXiv:2310.11454.

One pair of frozen random matrices A (r x in_max) and B (out_max x r) is shared by
every adapted layer; each layer trains only two vectors, b (out) and d (r):

    y = W x + Λ_b B Λ_d A x          Λ = diag(·); A, B sliced to the layer's in / out

              x ──► W ────────────────────────────────┐
              │                                        (+) ──► y
              └──► A ─► ⊙d ─► B ─► ⊙b ────────────────┘
                  (frozen, shared)

so a layer costs r + out trainable numbers whatever r is (peft's default r = 256).
A and B are Kaiming-uniform draws from a CPU generator seeded with
`projection_prng_key`, A first, exactly as peft draws them, so a seed alone
rebuilds them; they are still written with the adapter (`save_projection`).
Initialisation as in the paper and peft: b = 0, d = `d_initial`, so training
starts from the base model (`init_weights: false`: b = 1, d ~ N(0, 1)).
Mergeable; exported in peft's VERA format (projections under `base_model.vera_A`
and `base_model.vera_B`).
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..arch import set_submodule
from .base import AdapterLayer, ApplyContext, MethodConfig, MethodSpec, PeftExport, freeze_all, merge_and_unload
from .plan import Plan, low_rank_plan
from .reparam import (FAMILY, ReparamLoadError, delta_dtype, layers_of, load_by_name, peft_targets, target_names,
                      targets_in_dims)
from .targeting import check_target_list

PROJ_KEYS = ("base_model.vera_A", "base_model.vera_B")


class VeraConfig(MethodConfig):
    name: Literal["vera"] = "vera"
    r: int = Field(256, gt=0, le=65536, description="rank of the shared random projections")
    target_modules: Union[list[str], str, None] = Field(
        None, description="module name suffixes, a regex, or 'all-linear'; default per architecture")
    projection_prng_key: int = Field(0, ge=0, description="seed of the shared random projections A and B")
    save_projection: bool = Field(True, description="write A and B with the adapter (else rebuilt from the seed)")
    vera_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the layer input of the update")
    d_initial: float = Field(0.1, description="initial value of every entry of d")
    init_weights: bool = Field(True, description="true: b = 0, d = d_initial; false: b = 1, d random")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)


def kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = √3·√2/√fan_in (fan_in = shape[1]), drawn from `gen`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


class VeraProjections(nn.Module):
    """The frozen A and B every VeRA layer of a model shares (one module, held by each
    layer, so it moves with the model once and is never duplicated)."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), gen), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), gen), persistent=False)


class VeraLinear(AdapterLayer):
    """y = base(x) + b ⊙ B[:out] (d ⊙ A[:, :in] dropout(x))."""

    def __init__(self, base: nn.Linear, proj: VeraProjections, cfg: VeraConfig):
        super().__init__(base)
        self.vera_proj = proj
        self.r = cfg.r
        out, fin = base.weight.shape
        self.out_features, self.in_features = out, fin
        kw = dict(device=base.weight.device, dtype=delta_dtype(base))
        if cfg.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(out, **kw))
            self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **kw))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(out, **kw))
            self.vera_lambda_d = nn.Parameter(torch.randn(cfg.r, **kw))
        self.vera_dropout = nn.Dropout(cfg.vera_dropout) if cfg.vera_dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        dt = self.vera_lambda_d.dtype
        return (self.vera_proj.vera_A[:, : self.in_features].to(dt),
                self.vera_proj.vera_B[: self.out_features, :].to(dt))

    def delta_weight(self) -> torch.Tensor:
        a, b = self.projections()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.projections()
        h = F.linear(self.vera_dropout(x.to(a.dtype)), a) * self.vera_lambda_d
        return y + (F.linear(h, b) * self.vera_lambda_b).to(y.dtype)



def apply_vera(model: nn.Module, cfg: VeraConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    names = target_names(model, cfg.target_modules, "vera")
    bases = [model.get_submodule(n) for n in names]
    max_out = max(b.out_features for b in bases)
    max_in = max(b.in_features for b in bases)
    proj = VeraProjections(cfg.r, max_in, max_out, cfg.projection_prng_key).to(bases[0].weight.device)
    torch.manual_seed(ctx.seed)
    for n, base in zip(names, bases):
        set_submodule(model, n, VeraLinear(base, proj, cfg))


def count_vera_trainable(dims, cfg: VeraConfig, task: str) -> int:
    return sum(cfg.r + l.out_features for l in targets_in_dims(dims, cfg.target_modules, task))


def plan_vera(dims, cfg: VeraConfig, task: str) -> Plan:
    """Like a rank-r LoRA: the r-wide projection is kept (and the input, or its dropout)."""
    ranks = {l.name: cfg.r for l in targets_in_dims(dims, cfg.target_modules, task)}
    return low_rank_plan(dims, ranks, float(cfg.vera_dropout))


def export_vera_peft(model: nn.Module, cfg: VeraConfig, ctx: ApplyContext) -> PeftExport:
    layers = layers_of(model, VeraLinear)
    if not layers:
        raise ValueError("the model has no VeRA layers to export")
    tensors = {}
    for n, l in layers:
        tensors[f"base_model.model.{n}.vera_lambda_b"] = l.vera_lambda_b.detach().contiguous()
        tensors[f"base_model.model.{n}.vera_lambda_d"] = l.vera_lambda_d.detach().contiguous()
    if cfg.save_projection:
        proj = layers[0][1].vera_proj
        tensors[PROJ_KEYS[0]] = proj.vera_A.contiguous()
        tensors[PROJ_KEYS[1]] = proj.vera_B.contiguous()
    config = {
        "peft_type": "VERA", "r": cfg.r, "target_modules": peft_targets(model, layers),
        "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
        "vera_dropout": cfg.vera_dropout, "d_initial": cfg.d_initial, "fan_in_fan_out": False, "bias": "none",
        "init_weights": cfg.init_weights, "inference_mode": True,
    }
    return PeftExport(adapter_config=config, tensors=tensors)


def config_from_peft(cfg: dict) -> VeraConfig:
    """Our config for a peft VERA adapter_config.json."""
    unsupported = [k for k in ("layers_to_transform", "fan_in_fan_out") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"peft VeRA adapter uses options the engine does not import: {', '.join(unsupported)}")
    t = cfg.get("target_modules")
    return VeraConfig(r=cfg.get("r", 256), target_modules=t if isinstance(t, str) else list(t),
                      projection_prng_key=cfg.get("projection_prng_key", 0),
                      save_projection=bool(cfg.get("save_projection", True)), d_initial=cfg.get("d_initial", 0.1))


def load_vera_state(model: nn.Module, tensors: dict) -> None:
    """The vectors by name; saved projections replace the seeded ones (same shape)."""
    load_by_name(model, tensors, VeraLinear, skip=set(PROJ_KEYS))
    layers = layers_of(model, VeraLinear)
    if not layers:
        raise ReparamLoadError("the model has no VeRA layers to load into")
    proj = layers[0][1].vera_proj
    with torch.no_grad():
        for key, attr in zip(PROJ_KEYS, ("vera_A", "vera_B")):
            if key in tensors:
                buf = getattr(proj, attr)
                if tuple(tensors[key].shape) != tuple(buf.shape):
                    raise ReparamLoadError(f"tensor {key}: shape {tuple(tensors[key].shape)} does not fit the "
                                           f"shared projection {tuple(buf.shape)}")
                buf.copy_(tensors[key].to(buf.dtype))


PEFT_TYPE = "VERA"

SPEC = MethodSpec(
    name="vera", config_cls=VeraConfig, apply=apply_vera,
    paper="Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation (arXiv:2310.11454)",
    summary="Frozen random matrices A and B shared by all layers; each layer trains two scaling vectors "
            "b and d; mergeable.",
    trains="two scaling vectors per target linear layer (b: out, d: r)",
    mergeable=True, merge=merge_and_unload, peft_export=export_vera_peft, count_trainable=count_vera_trainable,
    load_state=load_vera_state, family=FAMILY, plan=plan_vera,
    default_lr=0.1,   # bench/RESULTS-default-lr.md
)
