"""LoKr: low-rank Kronecker-product adaptation, as in the LyCORIS library.

Yeh, Hsieh, Gao, Yang, Oh, Gong, "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024, arXiv:2309.14859.

A frozen weight W (out x in) becomes W + ΔW with

    ΔW = s · C ⊗ D,   C: a x c,   D: b x d = B·A (rank r) or full,   s = alpha / r

              x ──► W ────────────────────┐
              │                            (+) ──► y
              └──► (C ⊗ BA)·s ────────────┘

where out = a·b and in = c·d come from `factorization(n, decompose_factor)`
(peft's rule: the two factors closest to √n, or to the given factor). D is kept
as B·A when r < max(b, d)/2, else trained in full; `decompose_both` splits C the
same way. Names and initialisation follow peft: lokr_w1 (C, zero, or lokr_w1_a = 0
and lokr_w1_b Kaiming) and lokr_w2 / lokr_w2_a, lokr_w2_b (D, Kaiming), so training
starts from the base model. `rank_dropout` drops rows of ΔW (rescaled only with
`rank_dropout_scale`), `module_dropout` skips the update for a step. Mergeable;
exported in peft's LOKR format. The forward builds ΔW and keeps it for backward
(the estimator's `weight_saved`).
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from .base import ApplyContext, MethodConfig, MethodSpec, PeftExport, merge_and_unload
from .loha import dense_delta_plan, lycoris_rank_config, rank_alpha
from .lora import check_alpha_pattern, check_rank_pattern
from .plan import Plan
from .reparam import (FAMILY, DenseDeltaLinear, delta_dtype, layers_of, load_by_name, peft_targets, targets_in_dims,
                      wrap_targets)
from .targeting import check_target_list


class LokrConfig(MethodConfig):
    name: Literal["lokr"] = "lokr"
    r: int = Field(8, gt=0, le=4096, description="rank of the low-rank Kronecker factor")
    alpha: float = Field(8.0, gt=0, description="scale = alpha / r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of dropping a row of ΔW per step")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of skipping the update per step")
    rank_dropout_scale: bool = Field(False, description="rescale ΔW by the kept fraction of rows")
    decompose_both: bool = Field(False, description="also keep the small Kronecker factor as a low-rank product")
    decompose_factor: int = Field(-1, ge=-1, description="-1: factors near √n; k > 0: one factor k when it divides n")
    target_modules: Union[list[str], str, None] = Field(
        None, description="module name suffixes, a regex, or 'all-linear'; default per architecture")
    init_weights: bool = Field(True, description="true: the small factor starts at zero; false: random")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module-name regex -> rank")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="module-name regex -> alpha")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, v):
        if v == 0:
            raise ValueError("must be -1 (near the square root) or a positive factor, got 0")
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _ranks(cls, v):
        return check_rank_pattern(v)

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas(cls, v):
        return check_alpha_pattern(v)


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """(m, k) with m·k = n and m <= k: m = factor when it divides n; otherwise the
    divisor pair nearest √n whose walk up from (1, n) keeps m within `factor`
    (LyCORIS's and peft's rule)."""
    if factor > 0 and n % factor == 0:
        return factor, n // factor
    limit = n if factor == -1 else factor
    m, k = 1, n
    while m < k:
        cand = m + 1
        while n % cand:
            cand += 1
        if cand > limit:
            break
        m, k = cand, n // cand
    return (m, k) if m <= k else (k, m)


def lokr_shapes(out: int, fin: int, r: int, cfg: LokrConfig) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """((a, c), (b, d), C full, D full) for an out x in weight."""
    a, b = factorization(out, cfg.decompose_factor)
    c, d = factorization(fin, cfg.decompose_factor)
    full_c = not (cfg.decompose_both and r < max(a, c) / 2)
    full_d = not (r < max(b, d) / 2)
    return (a, c), (b, d), full_c, full_d


def lokr_count(out: int, fin: int, r: int, cfg: LokrConfig) -> int:
    (a, c), (b, d), full_c, full_d = lokr_shapes(out, fin, r, cfg)
    return (a * c if full_c else r * (a + c)) + (b * d if full_d else r * (b + d))


class LokrLinear(DenseDeltaLinear):
    """y = base(x) + x @ ΔWᵀ with ΔW = s · kron(C, D)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, cfg: LokrConfig):
        super().__init__(base, r, alpha, cfg.rank_dropout, cfg.module_dropout, cfg.rank_dropout_scale)
        out, fin = base.weight.shape
        (a, c), (b, d), full_c, full_d = lokr_shapes(out, fin, r, cfg)
        kw = dict(device=base.weight.device, dtype=delta_dtype(base))
        kaiming = lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5))   # noqa: E731
        with torch.no_grad():
            if full_c:
                self.lokr_w1 = nn.Parameter(torch.empty(a, c, **kw))
                (nn.init.zeros_ if cfg.init_weights else kaiming)(self.lokr_w1)
            else:
                self.lokr_w1_a = nn.Parameter(torch.empty(a, r, **kw))
                self.lokr_w1_b = nn.Parameter(torch.empty(r, c, **kw))
                (nn.init.zeros_ if cfg.init_weights else kaiming)(self.lokr_w1_a)
                kaiming(self.lokr_w1_b)
            if full_d:
                self.lokr_w2 = nn.Parameter(kaiming(torch.empty(b, d, **kw)))
            else:
                self.lokr_w2_a = nn.Parameter(kaiming(torch.empty(b, r, **kw)))
                self.lokr_w2_b = nn.Parameter(kaiming(torch.empty(r, d, **kw)))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        d = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return c, d

    def delta_weight(self) -> torch.Tensor:
        c, d = self.factors()
        return torch.kron(c, d) * self.scaling


def apply_lokr(model: nn.Module, cfg: LokrConfig, ctx: ApplyContext) -> None:
    wrap_targets(model, cfg.target_modules, "lokr", ctx.seed,
                 lambda n, base: LokrLinear(base, *rank_alpha(cfg, n), cfg))


def count_lokr_trainable(dims, cfg: LokrConfig, task: str) -> int:
    return sum(lokr_count(l.out_features, l.in_features, rank_alpha(cfg, l.name)[0], cfg)
               for l in targets_in_dims(dims, cfg.target_modules, task))


def plan_lokr(dims, cfg: LokrConfig, task: str) -> Plan:
    return dense_delta_plan(dims, cfg.target_modules, task)


def export_lokr_peft(model: nn.Module, cfg: LokrConfig, ctx: ApplyContext) -> PeftExport:
    layers = layers_of(model, LokrLinear)
    if not layers:
        raise ValueError("the model has no LoKr layers to export")
    tensors = {f"base_model.model.{n}.{p}": t.detach().contiguous()
               for n, l in layers for p, t in l.named_parameters() if not p.startswith("base_layer.")}
    config = {
        "peft_type": "LOKR", **lycoris_rank_config({n: (l.r, l.alpha) for n, l in layers}, cfg),
        "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
        "rank_dropout_scale": cfg.rank_dropout_scale, "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor, "target_modules": peft_targets(model, layers),
        "use_effective_conv2d": False, "init_weights": cfg.init_weights, "inference_mode": True,
    }
    return PeftExport(adapter_config=config, tensors=tensors)


def config_from_peft(cfg: dict) -> LokrConfig:
    """Our config for a peft LOKR adapter_config.json."""
    unsupported = [k for k in ("layers_to_transform", "exclude_modules", "use_effective_conv2d") if cfg.get(k)]
    if unsupported:
        raise ValueError(f"peft LoKr adapter uses options the engine does not import: {', '.join(unsupported)}")
    t = cfg.get("target_modules")
    return LokrConfig(r=cfg.get("r", 8), alpha=cfg.get("alpha", 8), target_modules=t if isinstance(t, str) else list(t),
                      decompose_both=bool(cfg.get("decompose_both")), decompose_factor=cfg.get("decompose_factor", -1),
                      rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {})


def load_lokr_state(model: nn.Module, tensors: dict) -> None:
    load_by_name(model, tensors, LokrLinear)


PEFT_TYPE = "LOKR"

SPEC = MethodSpec(
    name="lokr", config_cls=LokrConfig, apply=apply_lokr,
    paper="Yeh et al. 2024, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model "
          "Evaluation (arXiv:2309.14859)",
    summary="Trains ΔW = C ⊗ (BA), a Kronecker product of a small matrix and a low-rank one (LyCORIS); "
            "mergeable.",
    trains="two Kronecker factors (one low-rank) per target linear layer",
    mergeable=True, merge=merge_and_unload, peft_export=export_lokr_peft, count_trainable=count_lokr_trainable,
    load_state=load_lokr_state, family=FAMILY, plan=plan_lokr,
    default_lr=0.03,   # bench/RESULTS-default-lr.md
)
