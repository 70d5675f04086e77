"""The Launch form as data: which controls each method shows (read from its
config class), the form -> run config (and back, for 'clone'), and sweeps.
Pure functions, tested without a browser (tests/test_ui_logic.py)."""

from __future__ import annotations

import re
import typing
from typing import Any, Optional

import yaml

from engine.config import TASK_METRICS, TrainingConfig
from engine.data import BUNDLED_DATASETS
from engine.estimator import default_task as estimator_default_task
from engine.estimator import catalog_names, load_model_config, model_dims
from engine.methods import METHODS, default_learning_rate
from engine.methods.targeting import parse_target_list
from engine.models import BUNDLED_MODELS, TINY_MODELS

from .. import service

# A newcomer's first click trains a real model on real data: MiniLM on the sentiment demo with LoRA.
DEFAULT_METHOD = "lora"
DEFAULT_MODEL = "minilm"
DEFAULT_DATASET = "demo-sentiment"
# 60 steps at the method's default rate: MiniLM + LoRA reaches accuracy >= 0.96 for each of seeds 0-2
# (30 steps learned for seed 0 but not for seed 1: bench/RESULTS-default-lr.md)
DEFAULT_STEPS = 60
ESTIMATE_ONLY = " (estimate only)"


def estimate_only_models() -> list[str]:
    """Catalog models (engine/catalog) whose weights are not on this machine: the studio
    estimates them but cannot train them."""
    return [n for n in catalog_names() if n not in BUNDLED_MODELS and n not in TINY_MODELS]


# (label, value) of the Model list: the bundled models, the random test models, then every
# catalog model, marked as estimate only
MODEL_CHOICES = ([(n, n) for n in list(BUNDLED_MODELS) + list(TINY_MODELS)]
                 + [(n + ESTIMATE_ONLY, n) for n in estimate_only_models()])

STRATEGIES = ["ddp", "fsdp"]      # engine.config DistributedConfig.strategy
OPTIMIZERS = list(typing.get_args(TrainingConfig.model_fields["optimizer"].annotation))   # training.optimizer
DEFAULT_OPTIMIZER = TrainingConfig.model_fields["optimizer"].default
DEFAULT_EVAL_GENERATE = TrainingConfig.model_fields["eval_generate"].default    # causal LM only
WANDB_MODES = ["online", "offline"]      # engine.config WandbConfig.mode
SWEEP_KEYS = {"r": "r", "rank": "r", "method": "method", "lr": "lr", "learning_rate": "lr", "d": "d"}
SWEEP_SUFFIX = {"r": "r", "method": "", "lr": "lr", "d": "d"}
MAX_SWEEP = 12

# the non-method part of the Launch form, in the order the event handlers receive it
FORM_KEYS = ["run_name", "model", "task", "method", "extra_method", "ds_source", "ds_name", "upload_path",
             "text_col", "label_col", "prompt_col", "response_col", "max_rows", "max_steps", "batch", "lr", "seq",
             "eval_every", "seed", "strategy", "devices", "optimizer", "tasks_yaml", "temperature",
             "eval_generate", "metric", "mlflow_uri", "tensorboard", "wandb_project", "wandb_entity", "wandb_mode"]
FORM_HIDDEN = {"name", "random_rank_seed"}   # left to the YAML box


def default_lr(method: str) -> float:
    """The learning rate the Launch form shows for `method`: its measured default."""
    try:
        return default_learning_rate(method)
    except ValueError:
        return default_learning_rate(DEFAULT_METHOD)


# ------------------------------------------------------------------ what a picked model suggests

def model_family(model: str) -> Optional[str]:
    """'bert' / 'llama' / 'gpt2' for a model whose config the estimator reads without
    downloading (bundled, tiny, catalog, local config.json); None for anything else."""
    try:
        return model_dims(load_model_config(model)).family
    except (ValueError, OSError):
        return None


def default_task(model: str) -> Optional[str]:
    """The task the estimator assumes for `model` (encoders classify, decoders generate); None if unknown."""
    try:
        return estimator_default_task(model_dims(load_model_config(model)))
    except (ValueError, OSError):
        return None


def default_dataset(task: str) -> str:
    """The first bundled dataset of `task`."""
    return next((n for n, meta in BUNDLED_DATASETS.items() if meta["task"] == task), DEFAULT_DATASET)


def default_targets(model: str) -> str:
    """The architecture's usual LoRA targets for `model` ('' when the model is unknown)."""
    try:
        return ",".join(model_dims(load_model_config(model)).arch.default_lora_targets)
    except (ValueError, OSError):
        return ""


# ------------------------------------------------------------------ method fields -> form controls

def _kind_of(annotation) -> tuple[Optional[str], list]:
    """How a method-config field is edited in the form: int, float, bool,
    choice (with choices), text, modules (names or regex), intlist; None for
    structured fields (left to the YAML box)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _kind_of(rest[0])
        if set(map(typing.get_origin, rest)) | set(rest) >= {list, str}:
            return "modules", []
        return None, []
    if origin is typing.Literal:
        return "choice", list(args)
    if origin is list and args == (int,):
        return "intlist", []
    if origin is list and args == (str,):
        return "modules", []
    return {int: "int", float: "float", bool: "bool", str: "text"}.get(annotation), []


def method_field_kinds() -> dict[str, str]:
    """Every editable field of every method, by name, in a stable order."""
    kinds: dict[str, str] = {}
    for spec in METHODS.values():
        for fname, info in spec.config_cls.model_fields.items():
            if fname in FORM_HIDDEN or fname in kinds:
                continue
            kind, _ = _kind_of(info.annotation)
            if kind:
                kinds[fname] = kind
    return kinds


METHOD_FIELDS = method_field_kinds()


def method_fields(name: str) -> set[str]:
    """The fields of method `name` that the form shows."""
    spec = METHODS.get(name)
    return {f for f in spec.config_cls.model_fields if f in METHOD_FIELDS} if spec else set()


def _config_default(method: str, fname: str) -> Any:
    info = METHODS[method].config_cls.model_fields[fname]
    return None if info.is_required() else info.get_default(call_default_factory=True)


def field_default(method: str, fname: str, model: str = "") -> Any:
    """The value a control shows when `method` is picked."""
    default = _config_default(method, fname)
    kind = METHOD_FIELDS[fname]
    if fname == "target_modules" and default is None and "r" in method_fields(method):
        return default_targets(model)
    if kind in ("modules", "intlist", "text"):
        if default is None:
            return ""
        return ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return default


def field_choices(method: str, fname: str) -> list:
    return _kind_of(METHODS[method].config_cls.model_fields[fname].annotation)[1]


def method_help(name: str) -> str:
    spec = METHODS.get(name)
    if not spec:
        return ""
    merge = "mergeable into the base weights" if spec.mergeable else "not mergeable"
    return f"**{spec.name}** — {spec.summary} Trains: {spec.trains}; {merge}.  \n_{spec.paper}_"


def parse_modules(text: str):
    """`all-linear`, `re:<regex>` (the regex), or a comma-separated list of module name suffixes."""
    t = text.strip()
    if t == "all-linear":
        return t
    if t.startswith("re:"):
        return t[3:]
    return parse_target_list(t) or []


def convert_field(fname: str, value: Any) -> Any:
    """A control's value as the method config wants it; None means 'leave out'."""
    kind = METHOD_FIELDS[fname]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return bool(value)
    if kind == "modules":
        return parse_modules(str(value))
    if kind == "intlist":
        try:
            return [int(x) for x in re.split(r"[,\s]+", str(value).strip()) if x]
        except ValueError:
            raise service.SubmitError(f"method.{fname}: give whole numbers separated by commas") from None
    return value


def build_method(method: str, fields: dict[str, Any], extra_yaml: str = "") -> dict:
    """The method section of a run config from the controls the method uses,
    plus any extra options given as YAML."""
    if method not in METHODS:
        raise service.SubmitError(f"method.name: unknown method {method!r}")
    m: dict[str, Any] = {"name": method}
    order = list(METHODS[method].config_cls.model_fields)
    for fname in sorted(method_fields(method), key=order.index):
        v = convert_field(fname, fields.get(fname))
        if v is not None and (v != _config_default(method, fname) or fname in ("r", "target_modules", "d")):
            m[fname] = v     # other defaults stay implicit
    if extra_yaml and extra_yaml.strip():
        try:
            extra = yaml.safe_load(extra_yaml)
        except yaml.YAMLError as e:
            raise service.SubmitError(f"method options: not valid YAML: {e}") from None
        if not isinstance(extra, dict):
            raise service.SubmitError("method options: must be a mapping like `k: 2`")
        m.update(extra)
    return m


# ------------------------------------------------------------------ the form -> a run config

def form_dict(values: list, method_keys: list[str]) -> dict:
    """Positional handler arguments -> {key: value} (FORM_KEYS, then method fields)."""
    return dict(zip(FORM_KEYS + method_keys, values))


def _int(form: dict, key: str, field: str) -> int:
    try:
        return int(form[key])
    except (TypeError, ValueError):
        raise service.SubmitError(f"training.{field}: give a whole number") from None


def distributed_of(form: dict) -> tuple[str, int]:
    """(strategy, world size) from the form's strategy and devices fields (ddp, 1 when absent)."""
    strategy = form.get("strategy") or "ddp"
    if strategy not in STRATEGIES:
        raise service.SubmitError(f"training.distributed.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    devices = form.get("devices")
    if devices is None or (isinstance(devices, str) and not devices.strip()):
        return strategy, 1
    try:
        n = int(devices)
        if n != float(devices):
            raise ValueError
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise service.SubmitError(f"training.distributed.world_size: devices must be a whole number ≥ 1, "
                                  f"not {devices!r}")
    return strategy, n


def optimizer_of(form: dict) -> str:
    """training.optimizer from the form (the config's default when absent)."""
    opt = form.get("optimizer") or DEFAULT_OPTIMIZER
    if opt not in OPTIMIZERS:
        raise service.SubmitError(f"training.optimizer: {opt!r} is not one of {', '.join(OPTIMIZERS)}")
    return opt


def metric_choices(task: str) -> list[str]:
    """The metrics a run of `task` may be ranked by (engine.config.TASK_METRICS)."""
    return list(TASK_METRICS.get(task, TASK_METRICS["classification"]))


def default_metric(task: str) -> str:
    """The metric a run of `task` is ranked by when the config names none (RunConfig.metric_name)."""
    return "accuracy" if task == "classification" else "eval_loss"


def metric_of(form: dict) -> Optional[str]:
    """The config's `metric` from the form: None (left out) when it is the task's default;
    a metric of the other task is passed on for the schema to refuse, naming the field."""
    metric = form.get("metric")
    metric = metric.strip() if isinstance(metric, str) else metric
    return None if not metric or metric == default_metric(form.get("task") or "") else metric


def eval_generate_of(form: dict) -> Optional[int]:
    """training.eval_generate from the form (causal LM only; None: the default, left implicit)."""
    v = form.get("eval_generate")
    if form.get("task") != "causal_lm" or v is None or (isinstance(v, str) and not v.strip()):
        return None
    n = _int(form, "eval_generate", "eval_generate")
    return None if n == DEFAULT_EVAL_GENERATE else n


def tracking_of(form: dict) -> Optional[dict]:
    """The config's `tracking` section from the Tracking group (None: no tracker chosen).
    The MLflow URI is checked by the schema (no credentials in it)."""
    out: dict[str, Any] = {}
    uri = (form.get("mlflow_uri") or "").strip()
    if uri:
        out["mlflow"] = uri
    if form.get("tensorboard"):
        out["tensorboard"] = True
    project = (form.get("wandb_project") or "").strip()
    if project:
        entity = (form.get("wandb_entity") or "").strip()
        out["wandb"] = {"project": project, **({"entity": entity} if entity else {}),
                        "mode": form.get("wandb_mode") or "online"}
    return out or None


# ------------------------------------------------------------------ several datasets (dataset.tasks)

def parse_tasks(text: str) -> list[dict]:
    """The multi-task box (a YAML list of tasks) -> list of task dicts; '' -> []."""
    t = (text or "").strip()
    if not t:
        return []
    try:
        tasks = yaml.safe_load(t)
    except yaml.YAMLError as e:
        raise service.SubmitError(f"dataset.tasks: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tasks, list) or not all(isinstance(x, dict) for x in tasks):
        raise service.SubmitError("dataset.tasks: write a YAML list, one `- name: ...` entry per task")
    return tasks


def task_entry(form: dict, name: str = "") -> dict:
    """The dataset the form shows now (bundled or uploaded, columns, max rows) as one task."""
    if form.get("ds_source") == "upload":
        if not form.get("upload_path"):
            raise service.SubmitError("dataset: upload a file first (CSV, JSONL or Parquet)")
        entry: dict[str, Any] = {"path": form["upload_path"]}
        for k, key in (("text_column", "text_col"), ("label_column", "label_col"),
                       ("prompt_column", "prompt_col"), ("response_column", "response_col")):
            v = form.get(key)
            if v and str(v).strip():
                entry[k] = str(v).strip()
        default = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(form["upload_path"]).rsplit("/", 1)[-1].rsplit(".", 1)[0])
    else:
        entry = {"bundled": form.get("ds_name")}
        default = str(form.get("ds_name") or "task")
    if form.get("max_rows"):
        entry["max_rows"] = _int(form, "max_rows", "max_rows")
    return {"name": (name or "").strip() or default.strip("-.") or "task", **entry}


def add_task(text: str, form: dict, name: str = "") -> str:
    """The multi-task box with the form's current dataset appended (a repeated name gets a suffix)."""
    tasks = parse_tasks(text)
    entry = task_entry(form, name)
    names = {t.get("name") for t in tasks}
    base, k = entry["name"], 2
    while entry["name"] in names:
        entry["name"], k = f"{base}-{k}", k + 1
    return yaml.safe_dump(tasks + [entry], sort_keys=False)


def build_config(form: dict) -> dict:
    """The run config dict from the form (validated later by the same schema as REST/CLI)."""
    method = form["method"]
    m = build_method(method, {k: form.get(k) for k in METHOD_FIELDS}, form.get("extra_method") or "")
    if form.get("ds_source") == "upload":
        if not form.get("upload_path"):
            raise service.SubmitError("dataset: upload a file first (CSV, JSONL or Parquet)")
        ds: dict[str, Any] = {"path": form["upload_path"]}
        for k, key in (("text_column", "text_col"), ("label_column", "label_col"),
                       ("prompt_column", "prompt_col"), ("response_column", "response_col")):
            v = form.get(key)
            if v and str(v).strip():
                ds[k] = str(v).strip()
    else:
        ds = {"name": form.get("ds_name")}
    if form.get("max_rows"):
        ds["max_rows"] = _int(form, "max_rows", "max_rows")
    tasks = parse_tasks(form.get("tasks_yaml") or "")
    if tasks:       # several datasets: the listed tasks are the run's data
        ds = {"tasks": tasks}
        if form.get("temperature") not in (None, ""):
            try:
                ds["temperature"] = float(form["temperature"])
            except (TypeError, ValueError):
                raise service.SubmitError("dataset.temperature: give a number like 10") from None
    lr = form.get("lr")
    try:   # empty: left out, the method's default (engine.methods.default_learning_rate)
        lr = None if lr is None or (isinstance(lr, str) and not lr.strip()) else float(lr)
    except (TypeError, ValueError):
        raise service.SubmitError("training.learning_rate: give a number like 1e-3") from None
    model = (form.get("model") or "").strip()
    auto = f"{model}-{method}" + (f"-r{m['r']}" if "r" in m else "")
    training = {"max_steps": _int(form, "max_steps", "max_steps"), "batch_size": _int(form, "batch", "batch_size"),
                "max_seq_len": _int(form, "seq", "max_seq_len"),
                "eval_every": _int(form, "eval_every", "eval_every"), "seed": _int(form, "seed", "seed")}
    if lr is not None:
        training["learning_rate"] = lr
    strategy, world = distributed_of(form)
    if world > 1 or strategy != "ddp":      # one device, DDP: the default, left implicit
        training["distributed"] = {"strategy": strategy, "world_size": world}
    optimizer = optimizer_of(form)
    if optimizer != DEFAULT_OPTIMIZER:      # the default stays implicit
        training["optimizer"] = optimizer
    gen = eval_generate_of(form)
    if gen is not None:
        training["eval_generate"] = gen
    cfg = {"name": (form.get("run_name") or "").strip() or auto, "model": model, "task": form["task"],
           "dataset": ds, "method": m, "training": training}
    metric, tracking = metric_of(form), tracking_of(form)
    if metric:
        cfg["metric"] = metric
    if tracking:
        cfg["tracking"] = tracking
    return cfg


def parse_sweep(text: str) -> tuple[Optional[str], list[str]]:
    """'r: 4, 8, 16' -> ('r', ['4', '8', '16']); '' -> (None, [])."""
    t = (text or "").strip()
    if not t:
        return None, []
    key, sep, vals = t.partition(":")
    key = key.strip().lower()
    if not sep or key not in SWEEP_KEYS:
        raise service.SubmitError("sweep: write `r: 4, 8, 16`, `method: lora, dora`, `learning_rate: 1e-4, 5e-4` "
                                  "or `d: 10, 100, 1000` (subspace dimension)")
    values = [v.strip() for v in re.split(r"[,\s]+", vals) if v.strip()]
    if not values:
        raise service.SubmitError(f"sweep: no values after `{key}:`")
    if len(values) > MAX_SWEEP:
        raise service.SubmitError(f"sweep: at most {MAX_SWEEP} values")
    return SWEEP_KEYS[key], values


def _same_lr(a, b: float) -> bool:
    try:
        return abs(float(a) - b) <= 1e-12 + 1e-9 * b
    except (TypeError, ValueError):
        return False


def sweep_configs(form: dict, text: str) -> list[dict]:
    """One run config per sweep value, each validated-ready (names get a suffix)."""
    key, values = parse_sweep(text)
    if key is None:
        raise service.SubmitError("sweep: give the values to sweep, e.g. `r: 4, 8, 16`")
    out = []
    for v in values:
        f = dict(form)
        if key == "method" and v not in METHODS:
            raise service.SubmitError(f"sweep: unknown method {v!r}; choose from {', '.join(METHODS)}")
        if key == "r" and "r" not in method_fields(form["method"]):
            raise service.SubmitError(f"sweep: method {form['method']!r} has no rank r")
        if key == "d" and "d" not in method_fields(form["method"]):
            raise service.SubmitError(f"sweep: method {form['method']!r} has no subspace dimension d")
        f[key] = v
        if key == "method" and _same_lr(form.get("lr"), default_lr(form["method"])):
            f["lr"] = default_lr(v)      # the form showed its method's default: each method gets its own
        if key == "method" and v != form["method"] and "target_modules" in method_fields(v) \
                and not (f.get("target_modules") or "").strip():
            f["target_modules"] = default_targets(form.get("model") or "")
        cfg = build_config(f)
        if (form.get("run_name") or "").strip():
            cfg["name"] = f"{form['run_name'].strip()}-{SWEEP_SUFFIX[key]}{v}"
        elif key in ("lr", "d"):
            cfg["name"] += f"-{key}{v}"
        out.append(cfg)
    return out


def form_from_config(cfg: dict) -> dict:
    """The inverse of build_config, for 'clone into Launch'."""
    m = dict(cfg.get("method") or {})
    ds = cfg.get("dataset") or {}
    t = cfg.get("training") or {}
    form: dict[str, Any] = {
        "run_name": f"{cfg.get('name', 'run')}-copy", "model": cfg.get("model"), "task": cfg.get("task"),
        "method": m.get("name"), "ds_source": "upload" if ds.get("path") else "bundled",
        "ds_name": ds.get("name") or DEFAULT_DATASET, "upload_path": ds.get("path") or "",
        "text_col": ds.get("text_column") or "", "label_col": ds.get("label_column") or "",
        "prompt_col": ds.get("prompt_column") or "", "response_col": ds.get("response_column") or "",
        "max_rows": ds.get("max_rows"), "max_steps": t.get("max_steps") or DEFAULT_STEPS,
        "batch": t.get("batch_size", 8),
        "lr": t.get("learning_rate") or default_lr(m.get("name") or DEFAULT_METHOD),
        "seq": t.get("max_seq_len", 64), "eval_every": t.get("eval_every", 10),
        "seed": t.get("seed", 0), "strategy": (t.get("distributed") or {}).get("strategy", "ddp"),
        "devices": (t.get("distributed") or {}).get("world_size", 1),
        "tasks_yaml": yaml.safe_dump(ds["tasks"], sort_keys=False) if ds.get("tasks") else "",
        "temperature": ds.get("temperature", 10.0),
        "optimizer": t.get("optimizer") or DEFAULT_OPTIMIZER,
        "eval_generate": t.get("eval_generate", DEFAULT_EVAL_GENERATE),
        "metric": cfg.get("metric") or default_metric(cfg.get("task") or ""),
        "mlflow_uri": (cfg.get("tracking") or {}).get("mlflow") or "",
        "tensorboard": bool((cfg.get("tracking") or {}).get("tensorboard")),
        "wandb_project": ((cfg.get("tracking") or {}).get("wandb") or {}).get("project") or "",
        "wandb_entity": ((cfg.get("tracking") or {}).get("wandb") or {}).get("entity") or "",
        "wandb_mode": ((cfg.get("tracking") or {}).get("wandb") or {}).get("mode") or "online"}
    extra = {}
    for k, v in m.items():
        if k == "name":
            continue
        if k in METHOD_FIELDS:
            kind = METHOD_FIELDS[k]
            if kind in ("modules", "intlist") and isinstance(v, list):
                v = ", ".join(map(str, v))
            elif kind == "modules" and isinstance(v, str) and v != "all-linear":
                v = f"re:{v}"
            form[k] = v
        else:
            extra[k] = v
    form["extra_method"] = yaml.safe_dump(extra, sort_keys=False) if extra else ""
    return form
