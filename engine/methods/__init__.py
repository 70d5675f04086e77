"""The PEFT methods. `METHODS[name]` gives a MethodSpec (config class, apply function,
paper, family, whether it merges, peft export, exact count, activation plan), built
from the explicit list in `registry.SPECS`. `parse_method_config(dict)` validates a
method section of a run config against the right class.
"""

from __future__ import annotations

from typing import Any

from .base import ApplyContext, MethodConfig, MethodSpec, PeftExport, count_parameters, freeze_all
from .registry import SPECS


def _by_name(specs: list[MethodSpec]) -> dict[str, MethodSpec]:
    out: dict[str, MethodSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"engine.methods.registry: method {spec.name!r} is listed twice")
        out[spec.name] = spec
    return out


METHODS: dict[str, MethodSpec] = _by_name(SPECS)


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):     # e.g. a list from JSON: unhashable, a TypeError (a 500) below
        raise ValueError(f"method.name: must be a string, got {type(name).__name__}")
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


FALLBACK_LR = 5e-4   # a method whose spec gives no default_lr


def default_learning_rate(name: str) -> float:
    """The learning rate a run of method `name` trains with when its config gives none:
    the spec's `default_lr` (bench/RESULTS-default-lr.md measured them)."""
    lr = get_method(name).default_lr
    return float(lr) if lr is not None else FALLBACK_LR


def parse_method_config(data: Any) -> MethodConfig:
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError("method: must be a mapping with a 'name'")
    spec = get_method(data["name"])
    return spec.config_cls.model_validate(data)


__all__ = [
    "METHODS", "ApplyContext", "MethodConfig", "MethodSpec", "PeftExport",
    "count_parameters", "default_learning_rate", "freeze_all", "get_method", "method_names",
    "parse_method_config",
]
