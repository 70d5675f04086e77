"""Training states (engine.train.training_state) and launch jobs as safetensors +
JSON, never a pickle: every tensor goes into the safetensors payload, the rest of
the structure into its metadata as JSON with each tensor replaced by a reference.
Dicts with non-string keys (an optimizer's state is keyed by parameter index) and
tuples (Adam's betas) keep their types."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load, save as st_save, save_file

META_KEY = "peft_studio_state"
_T, _ITEMS, _TUPLE = "__tensor__", "__items__", "__tuple__"


def encode(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors by name) for a nested dict/list/tuple of tensors
    and JSON scalars; anything else is a TypeError naming where it is."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(o, where: str):
        if isinstance(o, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = o.detach().cpu().contiguous()
            return {_T: name}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o):
                return {k: enc(v, f"{where}.{k}") for k, v in o.items()}
            return {_ITEMS: [[enc(k, f"{where}[key]"), enc(v, f"{where}[{k!r}]")] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {_TUPLE: [enc(v, f"{where}[{i}]") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"state{where}: a {type(o).__name__} cannot be saved (tensors and JSON values only)")

    return enc(obj, ""), tensors


def decode(meta: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(meta, dict):
        if set(meta) == {_T}:
            return tensors[meta[_T]]
        if set(meta) == {_ITEMS}:
            return {_key(decode(k, tensors)): decode(v, tensors) for k, v in meta[_ITEMS]}
        if set(meta) == {_TUPLE}:
            return tuple(decode(v, tensors) for v in meta[_TUPLE])
        return {k: decode(v, tensors) for k, v in meta.items()}
    if isinstance(meta, list):
        return [decode(v, tensors) for v in meta]
    return meta


def _key(k):
    return tuple(k) if isinstance(k, list) else k


def save_state(obj: Any, path: str | Path) -> None:
    """Write `obj` atomically (a temporary file renamed into place)."""
    path = Path(path)
    meta, tensors = encode(obj)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: str | Path) -> Any:
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(META_KEY)
        if meta is None:
            raise ValueError(f"{path}: not a PEFT Studio state file (no {META_KEY} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return decode(json.loads(meta), tensors)


def state_to_bytes(obj: Any) -> bytes:
    meta, tensors = encode(obj)
    return st_save(tensors, metadata={META_KEY: json.dumps(meta)})


def state_from_bytes(data: bytes) -> Any:
    # the header (8-byte length, then JSON) carries the metadata
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = (header.get("__metadata__") or {}).get(META_KEY)
    if meta is None:
        raise ValueError(f"not a PEFT Studio state (no {META_KEY} metadata)")
    return decode(json.loads(meta), st_load(data))
