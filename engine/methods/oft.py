"""OFT: Orthogonal Finetuning.

Qiu, Liu, Feng, Xue, Feng, Liu, Zhang, Weller, Schölkopf, "Controlling
Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023, arXiv:2306.07280.

A frozen linear layer is rotated on its input side by a block-diagonal matrix R
whose b x b blocks are orthogonal by a Cayley parametrisation of skew-symmetric Q:

    y = W (Rᵀ x)  (x R for row vectors),   R = diag(R₁ … R_k),
    R_i = (I − Q_i)(I + Q_i)⁻¹,   Q_i = −Q_iᵀ

              x ──► [R₁ ⋱ R_k]ᵀ ──► W ──► y
                    (k blocks of b x b; each trains b(b−1)/2 numbers)

which keeps the angles between W's neurons (the paper's hyperspherical energy).
The blocks come from `oft_block_size` (or their number from `r`; give one, the
other 0); a size that does not divide the layer's input is moved to the nearest
divisor, as peft does. As in peft 0.21 the inverse is by default replaced with a
truncated Neumann series (`use_cayley_neumann`, `num_cayley_neumann_terms`), which
is not exactly orthogonal; set it false for the exact Cayley transform.
`block_share` trains one block for all k. Q starts at zero (R = I): training starts
from the base model. `module_dropout` replaces that fraction of blocks by the
identity for a step. Merge: W ← W Rᵀ over the input dimension (unmerge solves it
back). Exported in peft's OFT format (`oft_R.weight`: the upper triangles of Q).
peft's COFT (`coft`, a projection of Q into an ε-ball at every step) is not
supported, and adapters that use it are refused on import.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from .base import AdapterLayer, ApplyContext, MethodConfig, MethodSpec, PeftExport, merge_and_unload
from .plan import Plan
from .reparam import (FAMILY, delta_dtype, layers_of, load_by_name, peft_targets, targets_in_dims, weight_saved_plan,
                      wrap_targets)
from .targeting import check_target_list


class OftConfig(MethodConfig):
    name: Literal["oft"] = "oft"
    r: int = Field(0, ge=0, description="number of orthogonal blocks per layer (0: from oft_block_size)")
    oft_block_size: int = Field(32, ge=0, description="size of each orthogonal block (0: from r)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of blocks set to the identity per step")
    target_modules: Union[list[str], str, None] = Field(
        None, description="module name suffixes, a regex, or 'all-linear'; default per architecture")
    init_weights: bool = Field(True, description="true: R starts at the identity; false: Q ~ N(0, 0.1²)")
    block_share: bool = Field(False, description="one block shared by all blocks of a layer")
    use_cayley_neumann: bool = Field(True, description="approximate (I+Q)⁻¹ by a Neumann series (peft's default)")
    num_cayley_neumann_terms: int = Field(5, ge=1, le=64, description="terms of the Neumann series")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)

    @model_validator(mode="after")
    def _one_size(self):
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(f"r, oft_block_size: give exactly one of them (the other 0), got r={self.r}, "
                             f"oft_block_size={self.oft_block_size}")
        return self


def nearest_divisor(n: int, p: int) -> int:
    """The divisor of n nearest p (ties to the smaller one); n itself when p >= n (peft's rule)."""
    if p >= n:
        return n
    hi = p
    while hi <= n and n % hi:
        hi += 1
    lo = p
    while lo > 1 and n % lo:
        lo -= 1
    return lo if p - lo <= hi - p else hi


def blocks_of(fin: int, cfg: OftConfig) -> tuple[int, int]:
    """(number of blocks, block size) for a layer with `fin` inputs."""
    if cfg.r == 0:
        size = cfg.oft_block_size
        if fin % size or size > fin:
            size = nearest_divisor(fin, size)
        return fin // size, size
    k = cfg.r
    if fin % k or k > fin:
        k = nearest_divisor(fin, k)
    return k, fin // k


def neumann_coefficients(terms: int) -> list[float]:
    """Coefficients of I, Q, Q², … in peft 0.21's truncated series for (I+Q)(I−Q)⁻¹."""
    if terms == 1:
        return [1.0]
    if terms == 2:
        return [1.0, 2.0]
    return [1.0, 2.0, 2.0] + [2.0] * max(0, terms - 4) + [1.0]


class OftRotation(nn.Module):
    """The trainable upper triangles of the skew-symmetric Q blocks (`weight`: blocks x
    b(b−1)/2) and the block rotations they give."""

    def __init__(self, n_blocks: int, size: int, cfg: OftConfig, **kw):
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.zeros(n_blocks, size * (size - 1) // 2, **kw))
        if not cfg.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.weight, mean=0.0, std=0.1)
        self.neumann = cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann else 0
        rows, cols = torch.triu_indices(size, size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self) -> torch.Tensor:
        """(blocks, b, b) rotation matrices."""
        w = self.weight
        m = torch.zeros(w.shape[0], self.size, self.size, device=w.device, dtype=w.dtype)
        m[:, self.rows, self.cols] = w
        q = m - m.transpose(-2, -1)
        eye = torch.eye(self.size, device=w.device, dtype=w.dtype).expand_as(q)
        if not self.neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        out, power = eye.clone(), eye
        for c in neumann_coefficients(self.neumann)[1:]:
            power = power @ q
            out = out + c * power
        return out


class OftLinear(AdapterLayer):
    """y = base(x R), R block-diagonal with orthogonal (Cayley) blocks acting on the input."""

    def __init__(self, base: nn.Linear, cfg: OftConfig):
        super().__init__(base)
        fin = base.in_features
        self.n_blocks, self.block_size = blocks_of(fin, cfg)
        self.block_share = cfg.block_share
        self.module_dropout = cfg.module_dropout
        kw = dict(device=base.weight.device, dtype=delta_dtype(base))
        self.oft_R = OftRotation(1 if cfg.block_share else self.n_blocks, self.block_size, cfg, **kw)

    def blocks(self) -> torch.Tensor:
        r = self.oft_R.rotations()
        return r.expand(self.n_blocks, -1, -1) if self.block_share else r

    def rotation(self) -> torch.Tensor:
        """The full block-diagonal R (in x in)."""
        return torch.block_diag(*self.blocks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        r = self.blocks()
        if self.training and self.module_dropout and self.n_blocks > 1:
            k = int(self.module_dropout * self.n_blocks)
            pick = torch.zeros(self.n_blocks, 1, 1, device=r.device, dtype=r.dtype)
            pick[torch.randperm(self.n_blocks, device=r.device)[:k]] = 1
            r = (1 - pick) * r + pick * torch.eye(self.block_size, device=r.device, dtype=r.dtype)
        xs = x.to(r.dtype).reshape(*x.shape[:-1], self.n_blocks, self.block_size)
        xr = torch.einsum("...rk,rkc->...rc", xs, r).reshape(x.shape)
        return self.base_layer(xr.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.to(self.oft_R.weight.dtype) @ self.rotation().T).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            rt = self.rotation().T.to(torch.float64)
            w.copy_(torch.linalg.solve(rt, w.to(torch.float64), left=False).to(w.dtype))
            self.merged = False


def apply_oft(model: nn.Module, cfg: OftConfig, ctx: ApplyContext) -> None:
    wrap_targets(model, cfg.target_modules, "oft", ctx.seed, lambda _name, layer: OftLinear(layer, cfg))


def count_oft_trainable(dims, cfg: OftConfig, task: str) -> int:
    total = 0
    for l in targets_in_dims(dims, cfg.target_modules, task):
        k, b = blocks_of(l.in_features, cfg)
        total += (1 if cfg.block_share else k) * (b * (b - 1) // 2)
    return total


def saved_rotations(cfg: OftConfig) -> int:
    """How many (blocks x b x b) tensors building R keeps for backward: the powers of Q
    of the Neumann series and R itself (measured: the exact solve keeps about 3)."""
    if not cfg.use_cayley_neumann:
        return 3
    m = len(neumann_coefficients(cfg.num_cayley_neumann_terms)) - 1   # matrix products
    return m + 1 if m >= 2 else 1


def plan_oft(dims, cfg: OftConfig, task: str) -> Plan:
    """Each target keeps its input (for R's gradient) and the rotation blocks."""
    sizes = {}
    for l in targets_in_dims(dims, cfg.target_modules, task):
        k, b = blocks_of(l.in_features, cfg)
        sizes[l.name] = (1 if cfg.block_share else k) * b * b * saved_rotations(cfg)
    return weight_saved_plan(dims, sizes)


def export_oft_peft(model: nn.Module, cfg: OftConfig, ctx: ApplyContext) -> PeftExport:
    layers = layers_of(model, OftLinear)
    if not layers:
        raise ValueError("the model has no OFT layers to export")
    tensors = {f"base_model.model.{n}.oft_R.weight": l.oft_R.weight.detach().contiguous() for n, l in layers}
    config = {
        "peft_type": "OFT", "r": cfg.r, "oft_block_size": cfg.oft_block_size, "module_dropout": cfg.module_dropout,
        "target_modules": peft_targets(model, layers), "fan_in_fan_out": False, "bias": "none",
        "init_weights": cfg.init_weights, "coft": False, "eps": 6e-5, "block_share": cfg.block_share,
        "use_cayley_neumann": cfg.use_cayley_neumann, "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
        "inference_mode": True,
    }
    return PeftExport(adapter_config=config, tensors=tensors)


def config_from_peft(cfg: dict) -> OftConfig:
    """Our config for a peft OFT adapter_config.json."""
    unsupported = [k for k in ("layers_to_transform", "exclude_modules", "fan_in_fan_out", "coft") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"peft OFT adapter uses options the engine does not import: {', '.join(unsupported)}")
    t = cfg.get("target_modules")
    return OftConfig(r=cfg.get("r", 0), oft_block_size=cfg.get("oft_block_size", 32),
                     target_modules=t if isinstance(t, str) else list(t), block_share=bool(cfg.get("block_share")),
                     use_cayley_neumann=bool(cfg.get("use_cayley_neumann", True)),
                     num_cayley_neumann_terms=cfg.get("num_cayley_neumann_terms", 5))


def load_oft_state(model: nn.Module, tensors: dict) -> None:
    load_by_name(model, tensors, OftLinear)


PEFT_TYPE = "OFT"

SPEC = MethodSpec(
    name="oft", config_cls=OftConfig, apply=apply_oft,
    paper="Qiu et al. 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning (arXiv:2306.07280)",
    summary="Rotates each target layer's input by a block-diagonal orthogonal matrix (Cayley parametrisation), "
            "keeping the angles between neurons; mergeable.",
    trains="the skew-symmetric generators of the orthogonal blocks of each target linear layer",
    mergeable=True, merge=merge_and_unload, peft_export=export_oft_peft, count_trainable=count_oft_trainable,
    load_state=load_oft_state, family=FAMILY, plan=plan_oft,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)
