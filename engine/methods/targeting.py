"""Resolving `target_modules` the way peft does (a list of name suffixes, a regex
that must match the whole name, or `all-linear`), but strictly: every list entry
must match something, and the error lists the names that would have.

The same rules run on a live model (`resolve_targets`) and on a model config
alone (`resolve_targets_in_dims`, for exact parameter counts without weights),
so the engine and the estimator always pick the same modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from ..arch import Arch, arch_of

TargetSpec = Union[str, list[str], tuple[str, ...]]


class TargetModulesError(ValueError):
    pass


def parse_target_list(text: Union[str, Sequence[str], None]) -> Optional[list[str]]:
    """`"q_proj, v_proj"` -> `["q_proj", "v_proj"]`: the one parser of comma-separated
    target-module lists (REST query, CLI flag, Launch form). None or blank -> None; a
    list passes through with blanks dropped."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    out = [p.strip() for p in parts if p and p.strip()]
    return out or None


def linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def suffix_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def candidates_from_names(names: Sequence[str], blocks_path: str) -> list[str]:
    """Short names of the linear layers inside the blocks, deduplicated, sorted."""
    prefix = blocks_path + "."
    out = set()
    for name in names:
        if name.startswith(prefix):
            rest = name[len(prefix):].split(".", 1)
            if len(rest) == 2:
                out.add(rest[1].rsplit(".", 1)[-1])
                out.add(rest[1])
    return sorted(out)


def select_names(names: Sequence[str], targets: TargetSpec, arch: Arch) -> list[str]:
    """The names among `names` (module order) that `targets` selects.

    A string is `all-linear` (every linear layer inside the blocks) or a regex
    matched against the whole name; heads are never selected that way. A list
    selects names equal to an entry or ending in `.entry`; each entry must match."""
    head_names = set(arch.head_names)
    if isinstance(targets, str):
        if targets == "all-linear":
            chosen = [n for n in names if n.startswith(arch.blocks_path + ".")]
        else:
            try:
                rx = re.compile(targets)
            except re.error as e:
                raise TargetModulesError(f"method.target_modules: invalid regex {targets!r}: {e}") from None
            chosen = [n for n in names if rx.fullmatch(n)]
            if not chosen:
                raise TargetModulesError(
                    f"method.target_modules: regex {targets!r} matches no module; "
                    f"candidates: {', '.join(candidates_from_names(names, arch.blocks_path))}")
        return [n for n in chosen if n.split(".")[0] not in head_names]
    chosen_set: set[str] = set()
    missing = []
    for key in targets:
        hits = [n for n in names if suffix_matches(n, key)]
        if not hits:
            missing.append(key)
        chosen_set.update(hits)
    experts = arch.experts
    if missing and experts:
        expert_names = {experts.path.rsplit(".", 1)[-1], experts.router.rsplit(".", 1)[-1], *experts.params,
                        *(f"{experts.path}.{p}" for p in experts.params)}
        hit = [m for m in missing if m in expert_names or m.rsplit(".", 1)[-1] in expert_names]
        if hit:
            raise TargetModulesError(
                f"method.target_modules: {', '.join(repr(m) for m in hit)} names the experts or router of this "
                f"{arch.family} model. In transformers 5.x its experts are 3-D parameters "
                f"({', '.join(f'{experts.path}.{p}' for p in experts.params)}), not linear layers, and the router "
                f"stays frozen: adapt the experts with method.target_parameters (LoRA, as peft names them, e.g. "
                f"{[f'{experts.path}.{p}' for p in experts.params]}) and keep target_modules for linear layers "
                f"({', '.join(candidates_from_names(names, arch.blocks_path))})")
    if missing:
        raise TargetModulesError(
            f"method.target_modules: {', '.join(repr(m) for m in missing)} "
            f"match{'es' if len(missing) == 1 else ''} no module in this model; "
            f"candidates: {', '.join(candidates_from_names(names, arch.blocks_path))}")
    return [n for n in names if n in chosen_set]


def resolve_targets(model: nn.Module, targets: TargetSpec, *, want=linear_like) -> list[str]:
    """Full module names selected by `targets`, in module order. Raises
    TargetModulesError naming any list entry that matches no module, with the candidates."""
    names = [n for n, m in model.named_modules() if n and want(m)]
    return select_names(names, targets, arch_of(model))


# ---- the same, from a config alone ---------------------------------------------------------------

@dataclass(frozen=True)
class NamedLinear:
    """A linear layer of a model described by its config: full name and shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    conv1d: bool = False

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def linears_in_dims(dims, task: str, num_labels: Optional[int] = None) -> list[NamedLinear]:
    """Every linear layer of the model `dims` describes, in module order, with the
    names the transformers classes give them (blocks, BERT's pooler, heads)."""
    arch = dims.arch
    out: list[NamedLinear] = []
    for i in range(dims.num_layers):
        for ls in dims.block_linears():
            out.append(NamedLinear(f"{arch.blocks_path}.{i}.{ls.path}", ls.in_features, ls.out_features,
                                   ls.bias, ls.conv1d))
    h = dims.hidden_size
    if arch.is_encoder:
        ph = dims.pooler_hidden_size or h
        if arch.pooler:
            out.append(NamedLinear(arch.pooler, ph, ph, arch.pooler_bias))
        if task == "classification":
            for name in arch.classifier[:-1]:
                out.append(NamedLinear(name, h, h, arch.classifier_bias))
            out.append(NamedLinear(arch.classifier[-1], ph if arch.pooler else h, num_labels or 2,
                                   arch.classifier_bias))
    elif task == "classification":
        out.append(NamedLinear(arch.classifier[-1], h, num_labels or 2, arch.classifier_bias))
    else:
        out.append(NamedLinear("lm_head", h, dims.vocab_size, False))
    return out


_RESOLVED: dict = {}


def resolve_targets_in_dims(dims, targets: TargetSpec, task: str) -> list[NamedLinear]:
    """The linears `targets` selects in the model `dims` describes. Memoized on the
    config, the target spec and the task (not the rank): an estimate for a 70B model
    matches a few hundred names, and the UI asks again on every change of rank."""
    key = (dims.key, targets if isinstance(targets, str) else tuple(targets), task)
    hit = _RESOLVED.get(key)
    if hit is None:
        layers = linears_in_dims(dims, task)
        by_name = {l.name: l for l in layers}
        hit = tuple(by_name[n] for n in select_names([l.name for l in layers], targets, dims.arch))
        if len(_RESOLVED) >= 256:
            _RESOLVED.clear()
        _RESOLVED[key] = hit
    return list(hit)


def short_names(full_names: Iterable[str]) -> list[str]:
    """The last component of each name, deduplicated and sorted (peft's target list)."""
    return sorted({n.rsplit(".", 1)[-1] for n in full_names})


def peft_target_list(all_names: Sequence[str], chosen: Sequence[str]) -> list[str]:
    """A `target_modules` list for adapter_config.json that selects exactly `chosen`
    among `all_names` under peft's suffix rule: the short names when they are
    unambiguous, else the full module names."""
    shorts = short_names(chosen)
    selected = {n for n in all_names if any(suffix_matches(n, s) for s in shorts)}
    if selected == set(chosen):
        return shorts
    return sorted(chosen)


def check_target_list(v):
    """Validator body shared by every config with `target_modules`: an empty list or
    string names nothing (None means the architecture's default)."""
    if isinstance(v, list) and not v:
        raise ValueError("must name at least one module")
    if isinstance(v, str) and not v.strip():
        raise ValueError("must not be empty")
    return v
