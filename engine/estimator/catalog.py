"""Model configs the estimator reads (shipped catalog, tiny test models, a
config.json, a dict) and the GPU sizes it compares against."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional, Union

from ..dims import ModelDims, dims_from_config

GiB = 1 << 30
CATALOG_DIR = Path(__file__).resolve().parent.parent / "catalog"

# (label, bytes) of common GPU memory sizes: the one list the studio's GPU menu and
# gpu_fits() use. Vendors' "16 GB" cards hold 16 GiB.
GPU_PRESETS = (
    ("16 GB (V100 16GB, T4, A4000)", 16 * GiB),
    ("24 GB (RTX 3090/4090, A10, L4)", 24 * GiB),
    ("40 GB (A100 40GB)", 40 * GiB),
    ("48 GB (A6000, L40S)", 48 * GiB),
    ("80 GB (A100 80GB, H100)", 80 * GiB),
)


def catalog_names() -> list[str]:
    """Names of the model configs shipped in engine/catalog/."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.json"))


@functools.lru_cache(maxsize=64)
def catalog_text(name: str) -> Optional[str]:
    """The text of the shipped catalog config `name` (read once: the catalog is part of
    the code), or None when there is none by that name."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        return None
    path = CATALOG_DIR / f"{name}.json"
    return path.read_text() if path.is_file() else None


def load_model_config(name_or_path: Union[str, dict, Path]) -> dict:
    """A config.json dict for a catalog name, a tiny test model, a path to a
    config.json (or a directory holding one), or a dict (returned as a copy)."""
    if isinstance(name_or_path, dict):
        return dict(name_or_path)
    name = str(name_or_path)
    text = catalog_text(name) if "\x00" not in name else None
    if text is not None:
        return json.loads(text)
    from ..models import TINY_MODELS
    if name in TINY_MODELS:
        from ..models import tiny_config_dict
        return tiny_config_dict(name)
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"model: {name!r} is not a readable config.json: {e}") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ValueError(f"model: {name!r} has no model_type; is it a Hugging Face config.json?")
        return cfg
    raise ValueError(f"model: unknown model {name!r}; give a catalog name ({', '.join(catalog_names())}), "
                     f"a tiny test model ({', '.join(TINY_MODELS)}), a path to a config.json, or a config dict")


def model_dims(cfg: dict) -> ModelDims:
    """The dimensions of a config, or a ValueError naming the missing field."""
    try:
        return dims_from_config(cfg)
    except (KeyError, TypeError) as e:
        raise ValueError(f"model: config lacks a field the estimator needs: {e}") from None


def default_task(dims: ModelDims) -> str:
    """BERT-family encoders default to classification, decoders to causal LM."""
    return "classification" if dims.arch.is_encoder else "causal_lm"
