"""Resolving `target_modules` the way peft does (a list of name suffixes, a regex
that must match the whole name, or `all-linear`), but strictly: every list entry
must match something, and the error lists the names that would have."""

from __future__ import annotations

import re
from typing import Iterable, Union

from torch import nn

from ..arch import arch_of

TargetSpec = Union[str, list[str], tuple[str, ...]]


class TargetModulesError(ValueError):
    pass


def linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def suffix_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def candidate_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers inside the blocks, deduplicated, sorted."""
    arch = arch_of(model)
    prefix = arch.blocks_path + "."
    out = set()
    for name, mod in model.named_modules():
        if name.startswith(prefix) and linear_like(mod):
            rest = name[len(prefix):].split(".", 1)[1]   # strip the block index
            out.add(rest.rsplit(".", 1)[-1])
            out.add(rest)
    return sorted(out)


def resolve_targets(model: nn.Module, targets: TargetSpec, *, want=linear_like) -> list[str]:
    """Full module names selected by `targets`. Raises TargetModulesError naming any
    list entry that matches no module, with the candidates."""
    arch = arch_of(model)
    head_names = set(arch.head_names)
    names = [n for n, m in model.named_modules() if n and want(m)]
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
                    f"candidates: {', '.join(candidate_names(model))}")
        return [n for n in chosen if n.split(".")[0] not in head_names]
    chosen: list[str] = []
    missing = []
    for key in targets:
        hits = [n for n in names if suffix_matches(n, key)]
        if not hits:
            missing.append(key)
        chosen.extend(h for h in hits if h not in chosen)
    if missing:
        raise TargetModulesError(
            f"method.target_modules: {', '.join(repr(m) for m in missing)} "
            f"match{'es' if len(missing) == 1 else ''} no module in this model; "
            f"candidates: {', '.join(candidate_names(model))}")
    return sorted(chosen, key=names.index)


def short_names(full_names: Iterable[str]) -> list[str]:
    """The last component of each name, deduplicated and sorted (peft's target list)."""
    return sorted({n.rsplit(".", 1)[-1] for n in full_names})
