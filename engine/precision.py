"""The precision contract of a run, in one place (docs/precision.md).

`training.precision` is `auto | fp32 | bf16 | fp16`; `run_dtype(precision, device)`
turns it into the run's dtype: `auto` is bf16 on CUDA and fp32 on CPU. Under a
16-bit run dtype (mixed precision, Micikevicius et al., "Mixed Precision
Training", ICLR 2018):

- the frozen base weights live on the device in the run dtype from the moment they
  are loaded (engine.models, engine.loading);
- every trainable parameter - the ones a method adds and the base weights a method
  trains (`full`, `top_k`, `bitfit`, `ln_tuning`, the classification head) - is an
  fp32 master weight, so its gradient and its optimizer states are fp32 too
  (`settle_dtypes`, called once after the method is applied);
- the forward and backward run under `torch.autocast(dtype=run dtype)`, so matmuls
  compute in 16 bits while norms, softmax and the loss stay in fp32;
- fp16 (5 exponent bits) also needs loss scaling: `grad_scaler` gives the
  `torch.amp.GradScaler` the training loop uses; bf16 has fp32's range and none.

`fp32` trains everything in fp32 without autocast, as before the contract.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable, Iterable, Optional

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}


def pick_device(pref: str) -> torch.device:
    """The device `training.device` asks for (`auto`: CUDA when there is one). A rank
    of a CUDA process group takes the device of its LOCAL_RANK."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device: 'cuda' requested but no CUDA device is available")
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local)) if local is not None and local.isdigit() else torch.device("cuda")
    return torch.device("cpu")


def _kind(device) -> str:
    return device.type if isinstance(device, torch.device) else ("cuda" if str(device).startswith("cuda") else "cpu")


def run_dtype_name(precision: str, device) -> str:
    """`fp32`, `bf16` or `fp16`: what `precision` means on `device` (a torch.device or
    a device kind such as 'cpu' / 'cuda'). `auto` is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if _kind(device) == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"training.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def run_dtype(precision: str, device) -> torch.dtype:
    """The run's dtype: the dtype of its frozen base weights and of autocast's matmuls."""
    return DTYPES[run_dtype_name(precision, device)]


def autocast_dtype(precision: str, device) -> Optional[torch.dtype]:
    """The dtype for `torch.autocast`, None for an fp32 run (no autocast)."""
    dt = run_dtype(precision, device)
    return None if dt == torch.float32 else dt


def grad_scaler(dtype: Optional[torch.dtype], device: torch.device):
    """A `torch.amp.GradScaler` for an fp16 run (its gradients underflow without loss
    scaling), None otherwise. The master weights are fp32, so the scaler unscales fp32
    gradients."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


class ParamMap:
    """Values keyed by parameter identity. The parameters are held weakly and checked
    on lookup: a parameter freed on the way (QLoRA replaces the linears it quantizes)
    may have its id() reused by a new one (a LoRA matrix), which must not inherit the
    old one's value."""

    def __init__(self):
        self._d: dict[int, tuple] = {}

    def __setitem__(self, p: torch.Tensor, value) -> None:
        self._d[id(p)] = (weakref.ref(p), value)

    def get(self, p: torch.Tensor, default=None):
        e = self._d.get(id(p))
        return e[1] if e is not None and e[0]() is p else default

    def __contains__(self, p: torch.Tensor) -> bool:
        e = self._d.get(id(p))
        return e is not None and e[0]() is p

    def __len__(self) -> int:
        return len(self._d)


def param_set(params: Iterable[torch.Tensor]) -> ParamMap:
    out = ParamMap()
    for p in params:
        out[p] = True
    return out


def keeps_fp32(module: nn.Module) -> bool:
    """Modules whose parameters stay fp32 under every precision: LayerNorm, which autocast
    computes in fp32 on CUDA, and which on CPU accepts a bf16 or fp32 input only with
    fp32 parameters of one dtype (bitfit trains its bias while its weight is frozen).
    Their weights are a few thousandths of a model's."""
    return isinstance(module, nn.LayerNorm)


def fp32_kept(model: nn.Module) -> ParamMap:
    """The parameters `keeps_fp32` keeps in fp32."""
    return param_set(p for m in model.modules() if keeps_fp32(m) for p in m.parameters(recurse=False))


def floating_params(model: nn.Module) -> Iterable[nn.Parameter]:
    """Every floating-point parameter once (tied ones are one Parameter)."""
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen and p.is_floating_point():
            seen.add(id(p))
            yield p


@torch.no_grad()
def place_base(model: nn.Module, dtype: torch.dtype, device: torch.device) -> ParamMap:
    """Every floating parameter of a base model (no method applied yet) in `dtype` on
    `device`, other parameters and every buffer on `device` (buffers keep their dtype:
    rotary frequencies stay fp32, as transformers loads them). Returns each parameter
    whose dtype changed with its previous data. A no-op for a model loaded in
    place already."""
    previous = ParamMap()
    kept = fp32_kept(model)
    for p in {id(p): p for p in model.parameters()}.values():
        want = (torch.float32 if p in kept else dtype) if p.is_floating_point() else p.dtype
        if p.dtype != want or p.device != device:
            if p.dtype != want:
                previous[p] = p.data
            p.data = p.data.to(device=device, dtype=want)
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[k] = b.to(device)
    return previous


@torch.no_grad()
def settle_dtypes(model: nn.Module, dtype: torch.dtype, *, base: Optional[ParamMap] = None,
                  exact: Optional[Callable[[nn.Parameter], Optional[torch.Tensor]]] = None) -> None:
    """Put every parameter of a model with its method applied in its contract dtype:
    trainable parameters, and those of modules that `keeps_fp32`, become fp32 (master
    weights); frozen ones in `base` (ids of the model's parameters before the method
    was applied; None: every frozen parameter) take the run `dtype`. Frozen parameters
    a method added keep the dtype the method gave them. `exact(p)`, when given, may
    return the fp32 value a base weight had in its checkpoint (so `full` starts from
    the exact weights rather than from their bf16 rounding); None falls back to
    upcasting. The Parameter objects stay the same (tied weights stay tied,
    references held by methods stay valid)."""
    kept = fp32_kept(model)
    for p in floating_params(model):
        if p.requires_grad or p in kept:
            if p.dtype != torch.float32:
                src = exact(p) if exact is not None else None
                p.data = src.to(p.device, torch.float32) if src is not None else p.data.float()
        elif (base is None or p in base) and p.dtype != dtype:
            p.data = p.data.to(dtype)


def check_contract(model: nn.Module, dtype: torch.dtype, base: Optional[ParamMap] = None) -> list[str]:
    """Names of parameters that break the contract (trainable not fp32, frozen base not
    in `dtype`); empty when it holds. For tests and assertions."""
    bad, seen, kept = [], set(), fp32_kept(model)
    for n, p in model.named_parameters():
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        if (p.requires_grad or p in kept) and p.dtype != torch.float32:
            bad.append(f"{n} ({'trainable' if p.requires_grad else 'kept fp32'}, {p.dtype})")
        elif p in kept:
            continue
        elif not p.requires_grad and (base is None or p in base) and p.dtype != dtype:
            bad.append(f"{n} (frozen, {p.dtype})")
    return bad
