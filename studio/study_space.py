"""What a study searches: the request's checks (`parse_study`), its arms (one per method
entry), the even split of the budget, each arm's search space, and the run config of a
trial. Pure: no database, no queue; `suggest` takes an Optuna trial.

The learning rate is always searched, on a log scale, by default from the method's
measured default (`MethodSpec.default_lr`) / 10 to x 10, clipped to [1e-6, 1]: the default is
the best rate we measured for the method, so the range is centred on it in log space, where
TPE's prior is centred too. The user may
open more: `r`, `alpha`, `dropout` (applied to the methods whose config has that field:
the method's spec is asked, never its name) and `warmup_steps` (every method)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

LR_BELOW, LR_ABOVE = 10.0, 10.0
LR_FLOOR, LR_CEIL = 1e-6, 1.0
METHOD_FIELDS = ("r", "alpha", "dropout")       # opened on methods whose config declares them
TRAINING_FIELDS = ("warmup_steps",)
SEARCHABLE = ("learning_rate",) + METHOD_FIELDS + TRAINING_FIELDS
INT_FIELDS = ("r", "warmup_steps")
PRUNERS = ("successive_halving", "hyperband", "none")
MAX_ARMS = 12
MAX_TRIALS = 1000
DEFAULT_RETRIES = 2     # a trial whose worker died is requeued (and resumes), not lost


class StudyError(ValueError):
    """A study request that cannot be run; the message names the field."""


@dataclass
class Arm:
    """One searched method entry: its label (the method's name, or name plus the
    sizes given when a method appears twice) and its method section."""

    label: str
    method: dict

    @property
    def name(self) -> str:
        return self.method["name"]


def _range(field: str, v: Any) -> Any:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    for x in v):
        lo, hi = float(v[0]), float(v[1])
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or lo < 0:
            raise StudyError(f"search.{field}: [low, high] with 0 <= low <= high, got {v}")
        if field == "learning_rate" and lo <= 0:
            raise StudyError(f"search.learning_rate: low must be > 0 (a log scale), got {v[0]}")
        if field in INT_FIELDS:
            return [int(round(lo)), int(round(hi))]
        return [lo, hi]
    if isinstance(v, dict) and set(v) == {"choices"} and isinstance(v["choices"], list) and v["choices"]:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v["choices"]):
            raise StudyError(f"search.{field}.choices: numbers >= 0")
        return {"choices": sorted(set(v["choices"]))}
    raise StudyError(f"search.{field}: give [low, high] or {{\"choices\": [...]}}")


def parse_study(body: Any) -> dict:
    """Check a study request (the REST body / CLI file) and return it normalized:
    {name, base, methods: [method sections], budget: {trials | gpu_hours, max_trials},
    metric, search, pruner, parallel, seed}. Every error names the field."""
    from engine.config import METRIC_DIRECTION, TASK_METRICS, text_problem
    from engine.methods import get_method

    if not isinstance(body, dict):
        raise StudyError("study: must be a JSON object / YAML mapping")
    known = {"name", "base", "methods", "budget", "metric", "search", "pruner", "parallel", "seed"}
    extra = sorted(set(body) - known)
    if extra:
        raise StudyError(f"study: unknown key {extra[0][:50]!r} (a study takes {', '.join(sorted(known))})")
    name = body.get("name", "study")
    if not isinstance(name, str) or not 0 < len(name) <= 120 or text_problem(name):
        raise StudyError("name: 1 to 120 printable characters (no control characters or lone surrogates)")
    base = body.get("base")
    if not isinstance(base, dict):
        raise StudyError("base: a run config (model, dataset, training, ...) without 'method'")
    if "method" in base:
        raise StudyError("base.method: leave it out; the study's 'methods' list gives the methods")
    methods = body.get("methods")
    if not isinstance(methods, list) or not methods:
        raise StudyError("methods: a non-empty list of method names (or method sections with sizes)")
    if len(methods) > MAX_ARMS:
        raise StudyError(f"methods: at most {MAX_ARMS} methods in one study")
    sections = []
    for i, m in enumerate(methods):
        sec = {"name": m} if isinstance(m, str) else copy.deepcopy(m) if isinstance(m, dict) else None
        if sec is None or not isinstance(sec.get("name"), str):
            raise StudyError(f"methods.{i}: a method name or a mapping with 'name'")
        try:
            get_method(sec["name"])
        except ValueError as e:
            raise StudyError(f"methods.{i}: {str(e).removeprefix('method.name: ')}") from None
        sections.append(sec)
    if len({repr(sorted(s.items())) for s in sections}) != len(sections):
        raise StudyError("methods: the same method entry is given twice")
    task = base.get("task", "classification")
    if task not in ("classification", "causal_lm"):
        raise StudyError("base.task: classification or causal_lm")
    metric = body.get("metric") or ("accuracy" if task == "classification" else "eval_loss")
    if not isinstance(metric, str) or metric not in METRIC_DIRECTION:
        raise StudyError(f"metric: one of {', '.join(METRIC_DIRECTION)}, got {metric!r}")
    if task in TASK_METRICS and metric not in TASK_METRICS[task]:
        raise StudyError(f"metric: {metric!r} is not a {task} metric (one of {', '.join(TASK_METRICS[task])})")
    budget = body.get("budget")
    if not isinstance(budget, dict) or not ({"trials", "gpu_hours"} & set(budget)):
        raise StudyError("budget: {\"trials\": N} (total runs) or {\"gpu_hours\": H}")
    bad = sorted(set(budget) - {"trials", "gpu_hours", "max_trials"})
    if bad:
        raise StudyError(f"budget.{bad[0]}: unknown key (trials, gpu_hours, max_trials)")
    if "trials" in budget and "gpu_hours" in budget:
        raise StudyError("budget: give trials or gpu_hours, not both")
    norm_budget: dict[str, Any] = {}
    if "trials" in budget:
        n = budget["trials"]
        if isinstance(n, bool) or not isinstance(n, int) or not len(sections) <= n <= MAX_TRIALS:
            raise StudyError(f"budget.trials: a whole number from {len(sections)} (one per method) to {MAX_TRIALS}")
        norm_budget["trials"] = n
    else:
        h = budget["gpu_hours"]
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 < h <= 10_000:
            raise StudyError("budget.gpu_hours: a number of hours > 0")
        norm_budget["gpu_hours"] = float(h)
        mt = budget.get("max_trials", 50 * len(sections))
        if isinstance(mt, bool) or not isinstance(mt, int) or not len(sections) <= mt <= MAX_TRIALS:
            raise StudyError(f"budget.max_trials: a whole number from {len(sections)} to {MAX_TRIALS}")
        norm_budget["max_trials"] = mt
    search = body.get("search") or {}
    if not isinstance(search, dict):
        raise StudyError("search: a mapping of hyperparameter -> [low, high]")
    norm_search = {}
    for k, v in search.items():
        if k not in SEARCHABLE:
            raise StudyError(f"search.{k}: not searchable (one of {', '.join(SEARCHABLE)})")
        norm_search[k] = _range(k, v)
    if isinstance(norm_search.get("learning_rate"), dict):
        raise StudyError("search.learning_rate: give [low, high] (searched on a log scale)")
    pruner = body.get("pruner", "successive_halving")
    if not isinstance(pruner, str) or pruner not in PRUNERS:
        raise StudyError(f"pruner: one of {', '.join(PRUNERS)}")
    parallel = body.get("parallel", len(sections))
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= 256:
        raise StudyError("parallel: trials in flight at once, 1 to 256")
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise StudyError("seed: a whole number from 0 to 2**31 - 1")
    return {"name": name, "base": copy.deepcopy(base), "methods": sections, "budget": norm_budget,
            "metric": metric, "search": norm_search, "pruner": pruner, "parallel": parallel, "seed": seed}


def arms(spec: dict) -> list[Arm]:
    """One arm per method entry; a method given twice is labelled with its sizes."""
    names = [m["name"] for m in spec["methods"]]
    out = []
    for m in spec["methods"]:
        label = m["name"]
        if names.count(m["name"]) > 1:
            extras = "-".join(f"{k}{v}" for k, v in sorted(m.items()) if k != "name") or "default"
            label = f"{m['name']}-{extras}"[:100]
        out.append(Arm(label, m))
    return out


def split_budget(total: int, k: int) -> list[int]:
    """`total` trials split evenly over `k` arms (the first arms get the remainder)."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def lr_range(spec: dict, method: str) -> tuple[float, float]:
    if "learning_rate" in spec["search"]:
        lo, hi = spec["search"]["learning_rate"]
        return float(lo), float(hi)
    from engine.methods import default_learning_rate

    d = default_learning_rate(method)
    return max(LR_FLOOR, d / LR_BELOW), min(LR_CEIL, d * LR_ABOVE)


def opened(spec: dict, method: str) -> dict:
    """The opened hyperparameters (besides the learning rate) that apply to `method`."""
    from engine.methods import get_method

    fields = get_method(method).config_cls.model_fields
    return {k: v for k, v in spec["search"].items()
            if k != "learning_rate" and (k in TRAINING_FIELDS or (k in METHOD_FIELDS and k in fields))}


def default_params(spec: dict, arm: Arm) -> dict:
    """The first trial of every arm: the method's measured default learning rate (clipped
    into the searched range) and the config's defaults of the opened fields (clipped too)."""
    from engine.config import TrainingConfig
    from engine.methods import default_learning_rate, get_method

    lo, hi = lr_range(spec, arm.name)
    params: dict[str, Any] = {"learning_rate": min(hi, max(lo, default_learning_rate(arm.name)))}
    fields = get_method(arm.name).config_cls.model_fields
    for k, rng in opened(spec, arm.name).items():
        cur = arm.method.get(k, fields[k].default if k in fields else TrainingConfig.model_fields[k].default)
        if isinstance(rng, dict):
            cur = min(rng["choices"], key=lambda c: abs(c - cur))
        else:
            cur = min(rng[1], max(rng[0], cur))
        params[k] = int(cur) if k in INT_FIELDS else float(cur)
    return params


def suggest(trial, spec: dict, arm: Arm) -> dict:
    """Draw a trial's parameters from its arm's search space (Optuna's define-by-run API)."""
    lo, hi = lr_range(spec, arm.name)
    params: dict[str, Any] = {"learning_rate": trial.suggest_float("learning_rate", lo, hi, log=True)}
    for k, rng in opened(spec, arm.name).items():
        if isinstance(rng, dict):
            params[k] = trial.suggest_categorical(k, rng["choices"])
        elif k in INT_FIELDS:
            params[k] = trial.suggest_int(k, rng[0], rng[1], log=k == "r" and rng[0] > 0)
        else:
            params[k] = trial.suggest_float(k, rng[0], rng[1])
    return params


def trial_config(spec: dict, arm: Arm, params: dict, study_id: int, number: int) -> dict:
    """The run config of one trial: the base, the arm's method with the drawn sizes, the
    drawn learning rate / warm-up, the study's metric, and retries (a lost worker requeues)."""
    cfg = copy.deepcopy(spec["base"])
    method = copy.deepcopy(arm.method)
    training = dict(cfg.get("training") or {})
    for k, v in params.items():
        if k in TRAINING_FIELDS or k == "learning_rate":
            training[k] = v
        else:
            method[k] = v
    training.setdefault("retries", DEFAULT_RETRIES)
    cfg["training"] = training
    cfg["method"] = method
    cfg["metric"] = spec["metric"]
    cfg["name"] = trial_run_name(spec, arm, study_id, number)
    return cfg


def trial_run_name(spec: dict, arm: Arm, study_id: int, number: int) -> str:
    """A trial's run name; unique per (study, arm, number), so a driver that stopped after
    submitting a run, before recording it, finds that run again instead of launching twice."""
    return f"study{study_id}-{arm.label}-t{number}"[:200]


def direction(metric: str) -> str:
    from engine.config import METRIC_DIRECTION

    return "maximize" if METRIC_DIRECTION[metric] else "minimize"


def better(metric: str, a: Optional[float], b: Optional[float]) -> bool:
    """True when value `a` beats `b` under the metric's direction (None loses)."""
    from engine.config import METRIC_DIRECTION

    if a is None:
        return False
    if b is None:
        return True
    return a > b if METRIC_DIRECTION[metric] else a < b
