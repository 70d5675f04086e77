"""Launch checks and figures the studio derives from a run config without training it:
whether a model is estimate-only (a catalog entry, no weights here), the model's config
without its weights, the method applied to a weightless copy (the structure check and the
parameter counts the worker will record), and the dataset read against the task before a
run is queued."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from workers.settings import Settings

from .errors import InternalError, SubmitError

log = logging.getLogger("peft_studio.service")


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
        out = check_against_model(cfg, settings)
    except (ConfigError, SubmitError, ValueError):
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
            raise SubmitError(msg) from None


def model_config_for(name: str, settings: Optional[Settings] = None) -> Optional[dict]:
    """config.json of a model without weights: bundled/tiny/catalog/local; None for a hub id."""
    from engine.models import ModelLoadError, check_local_model_dir

    # fuzzing: a 5000-character name made Path.exists() raise OSError (ENAMETOOLONG, a 500),
    # and control characters (NUL ...) were queued as hub ids; neither names a model
    if len(name) > 500 or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ModelLoadError("model: not a model name (over 500 characters or control characters)")
    # a path is checked against the allowed model roots before anything reads it: the
    # estimator's loader would read any config.json, so it only gets names (catalog)
    if "/" not in name and "\\" not in name and not name.startswith((".", "~")):
        from engine.estimator import load_model_config
        try:
            return load_model_config(name)
        except ValueError:   # not a catalog, bundled or tiny name: a local directory or a hub id
            pass
    p = Path(name).expanduser()
    if p.is_absolute() or name.startswith((".", "~")) or p.exists():
        roots = settings.model_roots if settings else None
        d = check_local_model_dir(p, roots)
        return json.loads((d / "config.json").read_text())
    return None


def check_against_model(cfg, settings: Optional[Settings] = None) -> Optional[tuple[int, int]]:
    """Apply the method to a weightless copy of the model (engine.prepare.dry_run);
    returns (n_params, n_trainable) or None when the model's config is not available here."""
    from engine.models import ModelLoadError
    from engine.prepare import dry_run

    try:
        conf = model_config_for(cfg.model, settings)
    except ModelLoadError as e:
        raise SubmitError(str(e)) from None
    if conf is None or not conf.get("model_type"):
        return None
    from engine.methods import get_method

    try:
        return dry_run(cfg, conf)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise SubmitError(str(e)) from None
    except Exception as e:
        # quantizing a base (QLoRA's NF4) reads its weights, which the meta device has not;
        # the worker checks such a run when it loads the model. Anything else is our fault.
        if get_method(cfg.method.name).quantizes_base:
            log.info("meta-device check skipped for %s (it quantizes the base): %s", cfg.method.name, e)
            return None
        raise InternalError(f"method: the structure check of {cfg.method.name!r} on {cfg.model!r} failed "
                            f"({type(e).__name__}: {e}); this is a fault in the studio, not in the config") from e
