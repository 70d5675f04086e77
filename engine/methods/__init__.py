"""The PEFT method registry: one module per method family registers its specs.

`METHODS[name]` gives a MethodSpec (config class, apply function, paper, whether
it merges, peft export). `parse_method_config(dict)` validates a method section
of a run config against the right class.
"""

from __future__ import annotations

from typing import Any

from .base import ApplyContext, MethodConfig, MethodSpec, PeftExport, count_parameters, freeze_all

METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def parse_method_config(data: Any) -> MethodConfig:
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError("method: must be a mapping with a 'name'")
    spec = get_method(data["name"])
    return spec.config_cls.model_validate(data)


from . import registry as _registry  # noqa: E402,F401  (registers the built-in methods)

__all__ = [
    "METHODS", "ApplyContext", "MethodConfig", "MethodSpec", "PeftExport",
    "count_parameters", "freeze_all", "get_method", "method_names", "parse_method_config", "register",
]
