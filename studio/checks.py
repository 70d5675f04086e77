"""Launch checks and figures the studio derives from a run config without training it:
whether a model is estimate-only (a catalog entry, no weights here), the parameter counts
the worker will record, and the dataset read against the task before a run is queued."""

from __future__ import annotations

import json
from typing import Optional

from workers.settings import Settings

from . import service


def is_estimate_only(model: str) -> bool:
    """A catalog model (engine/catalog: llama-3-8b, mistral-7b, ...) that is neither bundled
    nor a tiny test model: its config is known, its weights are not here."""
    from engine.estimator import catalog_names
    from engine.models import BUNDLED_MODELS, TINY_MODELS

    return model in catalog_names() and model not in BUNDLED_MODELS and model not in TINY_MODELS


def parameter_counts(model: str, task: str, method: dict, settings: Optional[Settings] = None) -> Optional[tuple]:
    """(n_params, n_trainable) of `method` applied to `model` for `task`, counted the way the
    worker counts the run it trains (engine.methods.count_parameters over the adapted model,
    built here on the meta device): the one source of the figures Launch and Runs show.
    None where the model's config is not available here or the method does not fit it."""
    from engine.config import ConfigError, parse_run_config
    from engine.data import BUNDLED_DATASETS

    key = (model, task, json.dumps(method, sort_keys=True, default=str), id(settings))
    if key in _COUNTS:
        return _COUNTS[key]
    ds = next((n for n, meta in BUNDLED_DATASETS.items() if meta["task"] == task), None)
    try:
        cfg = parse_run_config({"model": model, "task": task, "dataset": {"name": ds}, "method": method})
        out = service.check_against_model(cfg, settings)
    except (ConfigError, service.SubmitError, ValueError):
        out = None
    if len(_COUNTS) > 256:
        _COUNTS.clear()
    _COUNTS[key] = out
    return out


_COUNTS: dict = {}   # parameter_counts by (model, task, method, settings): the Launch form asks on each change


def check_dataset_for_task(cfg, settings: Settings) -> None:
    """Read and map each dataset of `cfg` as the worker will (engine.data.load_examples,
    into the same cache, so the worker then reads the cache): the task's columns must be
    there (text and a label with at least two values for classification; prompt/response
    or text for causal LM). Errors name the field and the file as it was uploaded."""
    from engine.data import DataError, load_examples
    from workers.datasets import resolve_dataset_path, upload_display_names

    multi = bool(cfg.dataset.tasks)
    for i, src in enumerate(cfg.dataset.sources()):
        try:
            load_examples(src, cfg.task, seed=cfg.training.seed, max_bytes=settings.max_upload_bytes,
                          path_resolver=lambda p: resolve_dataset_path(settings, p),
                          cache_dir=settings.data_dir / "data-cache")
        except (DataError, ValueError, LookupError, OSError) as e:
            msg = upload_display_names(settings, str(e))
            if multi:
                msg = msg.replace("dataset.", f"dataset.tasks.{i}.", 1)
            raise service.SubmitError(msg) from None
