"""Several trained adapters on one loaded base model, without loading the base again.

`AdapterBank(base, tokenizer, task)` holds one base model; `attach(key, cfg,
adapter_dir)` builds a *view*: a structural copy of the base's module tree whose
parameters and buffers are the very tensors of the base (`copy.deepcopy` with a
memo that maps every base tensor to itself), with the run's method applied to the
copy and the run's trained state loaded into it (`engine.adapters.load_adapter`,
the same code that rebuilds a run from scratch). A view so costs its own module
objects and its own new tensors (LoRA's A/B, a prefix, an adapter's bottleneck,
a classification head), not a second copy of the base weights. Hooks a method
registers (soft prompts, prefixes) live on the view's copied modules, so views
never see each other's.

Which base tensors a method writes is not assumed from its name or family: before
the real view is built, the same load runs once on a weightless skeleton (every
base tensor replaced by a `meta` tensor of the same shape). Any placeholder that
the method made trainable (BitFit's biases, LayerNorm tuning, a classification
head, full fine-tuning) or wrote in place (PiSSA's residual init, a BERT bias
that S4's BitFit group trains) marks that base tensor as the run's own: the real
view gets a private copy of it, counted in the view's `own_bytes`. A method the
skeleton cannot take (one that needs real values, e.g. quantizing the base) gets
a private copy of every tensor — still correct, and its bytes are counted. After
every attach the base's tensors are checked unchanged (torch's in-place version
counters), so a method that wrote into the shared base anyway is caught and the
bank refuses further use instead of serving wrong outputs.

This is the LoRA-family "hot swap" of peft's multi-adapter models (Mangrulkar et
al., PEFT, https://huggingface.co/docs/peft/developer_guides/mixed_models) done
by module copies rather than named adapter slots, so it serves every method of
engine/methods alike, prompt methods included.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

Loader = Callable[[nn.Module], nn.Module]


class BankError(RuntimeError):
    """The bank cannot serve (an adapter wrote into the shared base weights)."""


def base_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `model`, each tensor once."""
    seen: dict[int, torch.Tensor] = {}
    for t in chain(model.parameters(), model.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def storage_bytes(tensors) -> dict[int, int]:
    """Bytes per distinct storage (data pointer) among `tensors`."""
    out: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "meta":
            out.setdefault(storage_key(t), t.untyped_storage().nbytes())
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages of a model's parameters and buffers."""
    return sum(storage_bytes(base_tensors(model)).values())


def shared_copy(model: nn.Module, keep: Optional[set[int]] = None) -> nn.Module:
    """A copy of `model`'s module tree whose tensors are `model`'s own, except those
    whose id is in `keep`, which are copied."""
    keep = keep or set()
    memo = {id(t): t for t in base_tensors(model) if id(t) not in keep}
    return copy.deepcopy(model, memo)


def placeholder(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty_like(t, device="meta")
    return nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m


def written_tensors(model: nn.Module, load: Loader) -> Optional[set[int]]:
    """Ids of `model`'s tensors that `load` (applying a method and its trained state)
    makes trainable or writes in place, found on a weightless skeleton of the model;
    None when the skeleton cannot take the load (the caller then copies everything)."""
    tensors = base_tensors(model)
    stand_in = {id(t): placeholder(t) for t in tensors}
    back = {id(m): tid for tid, m in stand_in.items()}
    versions = {id(m): m._version for m in stand_in.values()}
    try:
        skeleton = copy.deepcopy(model, dict(stand_in))
        loaded = load(skeleton)
    except Exception:
        return None
    written = {back[id(p)] for p in loaded.parameters() if id(p) in back and p.requires_grad}
    written |= {back[mid] for mid, v in versions.items() if stand_in[back[mid]]._version != v}
    return written


@dataclass
class View:
    """One attached adapter: the model that computes with it, and what it costs."""

    key: Any
    model: nn.Module
    own_bytes: int          # tensors of its own (adapter weights, private copies of base tensors)
    shares_base: bool       # False: the skeleton could not take it, every tensor is private


class AdapterBank:
    """One base model and any number of adapters on it (see the module docstring).
    `lock` serialises use of the base (callers hold it while computing)."""

    def __init__(self, base: nn.Module, tokenizer: Any, task: str):
        self.base = base.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.task = task
        self.lock = threading.RLock()
        self._views: dict[Any, View] = {}
        self._base_storages = storage_bytes(base_tensors(self.base))
        self.base_bytes = sum(self._base_storages.values())
        self._poisoned: Optional[str] = None

    def _versions(self) -> dict[int, int]:
        return {id(t): t._version for t in base_tensors(self.base)}

    def _check_usable(self) -> None:
        if self._poisoned:
            raise BankError(self._poisoned)

    def attach_with(self, key: Any, load: Loader) -> View:
        """Attach the adapter that `load(model)` puts into a model (returning the model
        to use) under `key`; an existing view of `key` is returned as is."""
        with self.lock:
            self._check_usable()
            if key in self._views:
                return self._views[key]
            written = written_tensors(self.base, load)
            shares = written is not None
            keep = written if shares else {id(t) for t in base_tensors(self.base)}
            before = self._versions()
            with torch.no_grad():
                model = load(shared_copy(self.base, keep)).eval()
            changed = [i for i, v in self._versions().items() if before.get(i) != v]
            if changed:
                self._poisoned = (f"adapter {key!r} wrote into {len(changed)} shared base tensors; "
                                  f"the base must be loaded again")
                raise BankError(self._poisoned)
            for p in model.parameters():
                p.requires_grad_(False)
            own = sum(n for ptr, n in storage_bytes(base_tensors(model)).items() if ptr not in self._base_storages)
            view = View(key, model, own, shares)
            self._views[key] = view
            return view

    def attach(self, key: Any, cfg, adapter_dir: str | Path) -> View:
        """Attach a finished run's adapter: `cfg` is its RunConfig, `adapter_dir` the
        directory engine.adapters saved (peft or our own format)."""
        from .adapters import load_adapter

        if cfg.task != self.task:
            raise ValueError(f"task: the adapter is for {cfg.task}, this base is loaded for {self.task}")
        return self.attach_with(key, lambda m: load_adapter(m, cfg, adapter_dir))

    def view(self, key: Any) -> nn.Module:
        """The model that computes with adapter `key` (KeyError if not attached)."""
        self._check_usable()
        return self._views[key].model

    def detach(self, key: Any) -> None:
        with self.lock:
            self._views.pop(key, None)

    def keys(self) -> list:
        return list(self._views)

    def __contains__(self, key: Any) -> bool:
        return key in self._views

    @property
    def views_bytes(self) -> int:
        return sum(v.own_bytes for v in self._views.values())

    @property
    def total_bytes(self) -> int:
        """The base and every view's own tensors."""
        return self.base_bytes + self.views_bytes
