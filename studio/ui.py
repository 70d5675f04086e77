"""The Gradio UI: Launch (config + live memory estimate), Runs (live progress,
actions, downloads), Compare (runs side by side), Playground (base vs adapter).
Everything shown is read from the database; a reopened browser shows the same
state. The pure helpers at the top are tested without a browser
(tests/test_ui_logic.py); the event wiring is in `build_ui`."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, Optional

import gradio as gr
import yaml

from engine.data import BUNDLED_DATASETS
from engine.methods import METHODS
from engine.models import BUNDLED_MODELS, TINY_MODELS
from workers.settings import Settings

from . import charts, compare, service

log = logging.getLogger("peft_studio.ui")
GIB = 1024 ** 3
GPU_PRESETS = {"16 GB (T4, V100-16)": 16e9, "24 GB (RTX 4090, A10)": 24e9, "40 GB (A100-40)": 40e9,
               "48 GB (A6000, L40S)": 48e9, "80 GB (A100-80, H100)": 80e9}
DEFAULT_GPU = "24 GB (RTX 4090, A10)"
MODEL_CHOICES = list(BUNDLED_MODELS) + list(TINY_MODELS)
DEFAULT_TASK = {"minilm": "classification", "tiny-bert": "classification", "smollm2-135m": "causal_lm",
                "tiny-llama": "causal_lm"}
DEFAULT_TARGETS = {"minilm": "query,value", "tiny-bert": "query,value", "smollm2-135m": "q_proj,v_proj",
                   "tiny-llama": "q_proj,v_proj"}
RUN_COLUMNS = ["id", "name", "model", "method", "rank", "status", "trainable %", "best metric",
               "est. peak GiB", "measured peak GiB", "tokens/s", "duration s", "owner"]
STATUS_FILTERS = ["all", "queued", "running", "succeeded", "failed", "cancelled"]
SWEEP_KEYS = {"r": "r", "rank": "r", "method": "method", "lr": "lr", "learning_rate": "lr"}
SWEEP_SUFFIX = {"r": "r", "method": "", "lr": "lr"}
MAX_SWEEP = 12

# the non-method part of the Launch form, in the order the event handlers receive it
FORM_KEYS = ["run_name", "model", "task", "method", "extra_method", "ds_source", "ds_name", "upload_path",
             "text_col", "label_col", "prompt_col", "response_col", "max_rows", "max_steps", "batch", "lr", "seq",
             "eval_every", "seed"]


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


FORM_HIDDEN = {"name", "random_rank_seed"}   # left to the YAML box


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


def field_default(method: str, fname: str, model: str = "") -> Any:
    """The value a control shows when `method` is picked."""
    info = METHODS[method].config_cls.model_fields[fname]
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    kind = METHOD_FIELDS[fname]
    if fname == "target_modules" and default is None and "r" in method_fields(method):
        return DEFAULT_TARGETS.get(model, "")
    if kind in ("modules", "intlist", "text"):
        if default is None:
            return ""
        return ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return default


def field_choices(method: str, fname: str) -> list:
    return _kind_of(METHODS[method].config_cls.model_fields[fname].annotation)[1]


def parse_targets(text: str):
    """`all-linear`, `re:<regex>`, or comma-separated module name suffixes."""
    t = text.strip()
    if t == "all-linear":
        return t
    if t.startswith("re:"):
        return t[3:]
    return [x.strip() for x in t.split(",") if x.strip()]


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
        return parse_targets(str(value))
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
    model_fields = METHODS[method].config_cls.model_fields
    for fname in sorted(method_fields(method), key=list(model_fields).index):
        v = convert_field(fname, fields.get(fname))
        info = model_fields[fname]
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if v is not None and (v != default or fname in ("r", "target_modules")):   # defaults stay implicit
            m[fname] = v
    if extra_yaml and extra_yaml.strip():
        try:
            extra = yaml.safe_load(extra_yaml)
        except yaml.YAMLError as e:
            raise service.SubmitError(f"method options: not valid YAML: {e}") from None
        if not isinstance(extra, dict):
            raise service.SubmitError("method options: must be a mapping like `k: 2`")
        m.update(extra)
    return m


def method_help(name: str) -> str:
    spec = METHODS.get(name)
    if not spec:
        return ""
    merge = "mergeable into the base weights" if spec.mergeable else "not mergeable"
    return f"**{spec.name}** — {spec.summary} Trains: {spec.trains}; {merge}.  \n_{spec.paper}_"


# ------------------------------------------------------------------ the form -> a run config

def form_dict(values: list, method_keys: list[str]) -> dict:
    """Positional handler arguments -> {key: value} (FORM_KEYS, then method fields)."""
    keys = FORM_KEYS + method_keys
    return dict(zip(keys, values))


def _int(form: dict, key: str, field: str) -> int:
    try:
        return int(form[key])
    except (TypeError, ValueError):
        raise service.SubmitError(f"training.{field}: give a whole number") from None


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
    try:
        lr = float(form["lr"])
    except (TypeError, ValueError):
        raise service.SubmitError("training.learning_rate: give a number like 5e-4") from None
    model = (form.get("model") or "").strip()
    auto = f"{model}-{method}" + (f"-r{m['r']}" if "r" in m else "")
    return {"name": (form.get("run_name") or "").strip() or auto, "model": model, "task": form["task"],
            "dataset": ds, "method": m,
            "training": {"max_steps": _int(form, "max_steps", "max_steps"), "batch_size": _int(form, "batch", "batch_size"),
                         "learning_rate": lr, "max_seq_len": _int(form, "seq", "max_seq_len"),
                         "eval_every": _int(form, "eval_every", "eval_every"), "seed": _int(form, "seed", "seed")}}


def parse_sweep(text: str) -> tuple[Optional[str], list[str]]:
    """'r: 4, 8, 16' -> ('r', ['4', '8', '16']); '' -> (None, [])."""
    t = (text or "").strip()
    if not t:
        return None, []
    key, sep, vals = t.partition(":")
    key = key.strip().lower()
    if not sep or key not in SWEEP_KEYS:
        raise service.SubmitError("sweep: write `r: 4, 8, 16`, `method: lora, dora` or `learning_rate: 1e-4, 5e-4`")
    values = [v.strip() for v in re.split(r"[,\s]+", vals) if v.strip()]
    if not values:
        raise service.SubmitError(f"sweep: no values after `{key}:`")
    if len(values) > MAX_SWEEP:
        raise service.SubmitError(f"sweep: at most {MAX_SWEEP} values")
    return SWEEP_KEYS[key], values


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
        f[key] = v
        if key == "method" and v != form["method"] and "target_modules" in method_fields(v) \
                and not (f.get("target_modules") or "").strip():
            f["target_modules"] = DEFAULT_TARGETS.get(form.get("model"), "")
        cfg = build_config(f)
        if (form.get("run_name") or "").strip():
            cfg["name"] = f"{form['run_name'].strip()}-{SWEEP_SUFFIX[key]}{v}"
        elif key == "lr":
            cfg["name"] += f"-lr{v}"
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
        "ds_name": ds.get("name") or "demo-sentiment", "upload_path": ds.get("path") or "",
        "text_col": ds.get("text_column") or "", "label_col": ds.get("label_column") or "",
        "prompt_col": ds.get("prompt_column") or "", "response_col": ds.get("response_column") or "",
        "max_rows": ds.get("max_rows"), "max_steps": t.get("max_steps") or 30, "batch": t.get("batch_size", 8),
        "lr": t.get("learning_rate", 5e-4), "seq": t.get("max_seq_len", 64), "eval_every": t.get("eval_every", 10),
        "seed": t.get("seed", 0)}
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


# ------------------------------------------------------------------ estimate

def gpu_choices(workers: list[dict]) -> list[tuple[str, str]]:
    """(label, bytes as text) for the GPU dropdown: the presets, then every GPU a live worker reports."""
    out = [(name, str(int(b))) for name, b in GPU_PRESETS.items()]
    for w in workers:
        dev, total = w.get("device") or "", w.get("total_memory")
        if total and dev.startswith("cuda"):
            out.append((f"{w['name']}: {dev.removeprefix('cuda:')} ({total / 1e9:.0f} GB)", str(int(total))))
    return out


def gpu_label(value: str, workers: list[dict]) -> str:
    return next((label for label, v in gpu_choices(workers) if v == str(value)), f"{int(value) / 1e9:.0f} GB")


MAX_BATCH_SHOWN = 4096


def preview_frame(rows: list[dict]):
    """First rows of a dataset as a table (long text cut)."""
    import pandas as pd

    return pd.DataFrame([{k: (v[:120] + "…") if isinstance(v, str) and len(v) > 120 else v for k, v in r.items()}
                         for r in rows])


def estimate_view(model, task, method, fields: dict, extra_yaml, batch, seq, formula, gpu, dtype, quant,
                  gpu_name: str = "") -> tuple:
    """(plotly figure, markdown) for the estimate panel; errors become a message, never an exception."""
    from engine.estimator import estimate, largest_batch_that_fits

    try:
        m = build_method(method, fields, extra_yaml or "")
        kw = dict(seq_len=int(seq), dtype=dtype, quant=quant, formula=formula, task=task)
        est = estimate(model, m, batch_size=int(batch), **kw)
    except Exception as e:
        return charts.empty("Memory estimate", "no estimate"), f"⚠ Estimate unavailable: {e}"
    d = est.to_dict()
    gpu_bytes = int(float(gpu)) if gpu else None
    name = gpu_name or (f"{gpu_bytes / 1e9:.0f} GB" if gpu_bytes else "")
    fits = ""
    if gpu_bytes:
        ok = d["rows"]["total"] <= gpu_bytes
        try:
            best = largest_batch_that_fits(gpu_bytes, model, m, max_batch=MAX_BATCH_SHOWN, **kw)
        except Exception:
            best = None
        best_text = "none" if best == 0 else (f"≥ {best}" if best == MAX_BATCH_SHOWN else str(best))
        fits = (f"**{'✓ fits' if ok else '✗ does not fit'}** on {name}"
                + (f" · largest batch that fits: **{best_text}**" if best is not None else ""))
    rows = " · ".join(f"{charts.ROW_LABELS[k]} {v / GIB:.3f}" for k, v in d["rows"].items() if k in charts.ROW_LABELS)
    notes = "".join(f"  \n_note: {n}_" for n in d.get("notes", [])[:3])
    text = (f"**Total: {d['rows']['total'] / GIB:.3f} GiB** ({formula} formula, batch {int(batch)}, "
            f"seq {int(seq)}, {dtype})  \n{fits}  \n"
            f"Trainable: **{d['n_trainable']:,}** of {d['n_params']:,} parameters "
            f"(**{d['trainable_percent']:.4f}%**)  \nGiB — {rows}{notes}")
    return charts.memory_bar(d["rows"], gpu_bytes, name, title=f"{model} · {method}"), text


# ------------------------------------------------------------------ runs

def trainable_pct(r: dict) -> Optional[float]:
    return (100 * r["n_trainable"] / r["n_params"]) if r.get("n_params") and r.get("n_trainable") else None


def run_row(r: dict) -> list:
    tr = trainable_pct(r)
    return [r["id"], r["name"], r["model"], r["method"], r["rank"], r["status"],
            None if tr is None else round(tr, 4),
            None if r["best_metric"] is None else round(r["best_metric"], 4),
            None if not r["estimated_peak_bytes"] else round(r["estimated_peak_bytes"] / GIB, 3),
            None if not r["measured_peak_bytes"] else round(r["measured_peak_bytes"] / GIB, 3),
            None if r["tokens_per_s"] is None else round(r["tokens_per_s"], 1),
            None if r["duration_s"] is None else round(r["duration_s"], 1), r["owner"] or "–"]


def filter_sort(rows: list[list], query: str = "", status: str = "all", sort_by: str = "id",
                descending: bool = True) -> list[list]:
    """Rows of the runs table whose text matches `query` (all words, any column) and
    whose status is `status`, sorted by a column (missing values last)."""
    words = [w for w in (query or "").lower().split() if w]
    si = RUN_COLUMNS.index("status")
    out = [r for r in rows if (status in (None, "", "all") or r[si] == status)
           and all(any(w in str(c).lower() for c in r) for w in words)]
    col = RUN_COLUMNS.index(sort_by) if sort_by in RUN_COLUMNS else 0
    present = [r for r in out if r[col] is not None]
    missing = [r for r in out if r[col] is None]
    present.sort(key=lambda r: (isinstance(r[col], str), r[col]), reverse=bool(descending))
    return present + missing


def runs_table(settings: Settings, owner: Optional[str] = None) -> list[list]:
    return [run_row(r) for r in service.list_runs(settings, owner=owner)]


def run_choices(runs: list[dict], statuses: tuple = ("succeeded",)) -> list[str]:
    return [f"#{r['id']} {r['name']} ({r['method']}, {r['status']})" for r in runs
            if not statuses or r["status"] in statuses]


def fmt_eta(s: Optional[float]) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_status_md(run: dict, metrics: list[dict]) -> str:
    last = metrics[-1] if metrics else {}
    evals = [m for m in metrics if m.get("eval")]
    ev = ", ".join(f"{k} {v:.4f}" for k, v in (evals[-1]["eval"] if evals else {}).items()
                   if isinstance(v, (int, float)))
    loss = last.get("loss")
    lines = [f"### Run {run['id']} · {run['name']} — `{run['status']}`",
             f"step **{run['steps_done']}** / {run['max_steps'] or '?'}"
             + (f" · loss **{loss:.4f}**" if loss is not None else ""),
             f"tokens/s **{last.get('tokens_per_s') or 0:.1f}** · ETA **{fmt_eta(last.get('eta_s'))}**" if last else "",
             f"validation: {ev}" if ev else "",
             f"worker: {run['worker_host'] or '–'} · device: {run['device'] or '–'} · "
             f"launched by: {run.get('owner') or '–'}",
             f"trainable: {run['n_trainable']:,} / {run['n_params']:,}" if run.get("n_params") else ""]
    if run.get("error") and run["status"] in ("failed", "cancelled"):
        lines.append(f"**{'Error' if run['status'] == 'failed' else 'Note'}:** {run['error']}")
    return "  \n".join(x for x in lines if x)


def run_log(run: dict, metrics: list[dict]) -> str:
    """A plain-text log of the run from what the database holds."""
    lines = [f"{run['created_at']}  run {run['id']} queued by {run.get('owner') or 'anonymous'}"]
    if run.get("started_at"):
        lines.append(f"{run['started_at']}  run {run['id']} started on {run.get('worker_host')} ({run.get('device')})")
    for m in metrics:
        ev = " ".join(f"{k}={v:.4f}" for k, v in (m.get("eval") or {}).items() if isinstance(v, (int, float)))
        loss = "–" if m.get("loss") is None else f"{m['loss']:.4f}"
        lr = "–" if m.get("lr") is None else f"{m['lr']:.2e}"
        lines.append(f"step {m['step']:>6}  loss {loss}  lr {lr}  tokens/s {m.get('tokens_per_s') or 0:.1f}"
                     + (f"  eval {ev}" if ev else ""))
    if run.get("finished_at"):
        lines.append(f"{run['finished_at']}  run {run['id']} {run['status']}"
                     + (f": {run['error']}" if run.get("error") else ""))
    return "\n".join(lines[-400:])


def run_signature(run: Optional[dict]) -> Optional[tuple]:
    return None if run is None else (run["id"], run["status"], run["steps_done"], run.get("finished_at"))


def write_download(data: bytes, name: str) -> str:
    """Bytes to a file Gradio may serve (under the temp dir), returning its path."""
    d = Path(tempfile.gettempdir()) / f"peft-studio-downloads-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / service.safe_filename(name)
    fd, tmp = tempfile.mkstemp(dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return str(path)


# ------------------------------------------------------------------ compare

def compare_view(settings: Settings, ids: list[int], x_axis: str, diff_only: bool) -> dict:
    """Everything the Compare tab shows for runs `ids` (charts, tables, CSV path, LoRA modules)."""
    runs = []
    for rid in ids:
        try:
            runs.append(service.get_run(settings, rid))
        except service.NotFound:
            continue
    x = compare.X_AXES.get(x_axis, "step")
    labels = [compare.run_label(r) for r in runs]
    metrics = {compare.run_label(r): compare.with_x(service.get_metrics(settings, r["id"]), x) for r in runs}
    metric = compare.metric_name_of(runs)
    points = [{"label": compare.run_label(r), "method": r["method"], "n_trainable": r.get("n_trainable"),
               "metric": r.get("best_metric")} for r in runs]
    cfg_header, cfg_rows = compare.config_table(runs, diff_only)
    table = compare.comparison_table(runs)
    csv_path = write_download(compare.to_csv(compare.TABLE_COLUMNS, table).encode(), "comparison.csv") if runs else None
    loras = [r for r in runs if compare.is_lora_run(r)]
    return {
        "runs": runs,
        "loss": charts.loss_curves(metrics, x="x", xlabel=x_axis, title="Training loss"),
        "eval": charts.eval_curves(metrics, metric, x="x", xlabel=x_axis),
        "tradeoff": charts.metric_vs_trainable(points, metric),
        "memory": charts.memory_compare(labels, [r.get("estimated_peak_bytes") for r in runs],
                                        [r.get("measured_peak_bytes") for r in runs],
                                        next((r.get("memory_kind") for r in runs if r.get("memory_kind")), "")),
        "speed": charts.simple_bars(labels, [r.get("tokens_per_s") for r in runs], "Throughput", "tokens/s"),
        "size": charts.simple_bars(labels, [((r.get("adapter") or {}).get("size") or 0) / 1024 for r in runs],
                                   "Adapter size", "KiB", color="#8b5cf6"),
        "table": table, "cfg_header": cfg_header, "cfg_rows": cfg_rows, "csv": csv_path,
        "lora_pair": loras[:2] if len(loras) >= 2 else [],
    }


# ------------------------------------------------------------------ the Blocks app

def build_ui(settings: Settings, auth=None) -> gr.Blocks:
    """The Blocks app. With `auth` (a studio.auth.Auth with users), each request's
    logged-in user is recorded on runs and non-admins see only their own runs."""

    def is_admin(u: Optional[str]) -> bool:
        return bool(auth) and auth.is_admin(u)

    def who(request: Optional[gr.Request]) -> Optional[str]:
        if auth is None or request is None:
            return None
        return auth.ui_user(request)

    def visible_owner(request) -> Optional[str]:
        """Whose runs this user sees: None = everyone's (no login, or an admin)."""
        u = who(request)
        return None if u is None or is_admin(u) else u

    def may_see(run: dict, request) -> bool:
        ow = visible_owner(request)
        return ow is None or run.get("owner") == ow

    method_keys = list(METHOD_FIELDS)

    with gr.Blocks(title="PEFT Studio", analytics_enabled=False) as demo:
        gr.Markdown("# PEFT Studio\nPick a model, a PEFT method and its size; see the memory it needs; "
                    "launch; watch; compare; try; download an adapter that Hugging Face `peft` loads as-is.")
        selected_store = gr.BrowserState(None, storage_key="peft-studio-selected-run")
        with gr.Tabs(selected="launch") as tabs:
            # ====================================================== Launch
            with gr.Tab("Launch", id="launch", elem_id="tab-launch"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            model = gr.Dropdown(MODEL_CHOICES, value="tiny-bert", label="Model", allow_custom_value=True,
                                                info="bundled model, local Hugging Face directory, or hub id",
                                                elem_id="model")
                            task = gr.Radio(["classification", "causal_lm"], value="classification", label="Task",
                                            elem_id="task")
                        with gr.Row():
                            method = gr.Dropdown(list(METHODS), value="lora", label="Method", elem_id="method")
                            run_name = gr.Textbox(label="Run name", placeholder="auto", elem_id="run-name")
                        method_md = gr.Markdown(method_help("lora"), elem_id="method-help")
                        field_comps: dict[str, gr.components.Component] = {}
                        with gr.Row(elem_id="method-fields"):
                            for fname, kind in METHOD_FIELDS.items():
                                vis = fname in method_fields("lora")
                                val = field_default("lora", fname, "tiny-bert") if vis else None
                                common = dict(label=fname, visible=vis, elem_id=f"mf-{fname}", min_width=150)
                                if fname == "r":
                                    c = gr.Slider(1, 256, value=val or 8, step=1, label="rank r", visible=vis,
                                                  elem_id="rank", min_width=260)
                                elif kind == "int":
                                    c = gr.Number(val, precision=0, **common)
                                elif kind == "float":
                                    c = gr.Number(val, **common)
                                elif kind == "bool":
                                    c = gr.Checkbox(bool(val), **common)
                                elif kind == "choice":
                                    first = next(s for s in METHODS.values() if fname in s.config_cls.model_fields)
                                    ch = field_choices("lora" if vis else first.name, fname)
                                    c = gr.Dropdown(ch, value=val if vis else ch[0], **common)
                                else:
                                    if fname == "target_modules":
                                        common.update(label="target modules", elem_id="targets", min_width=260,
                                                      info="comma-separated suffixes, re:<regex>, or all-linear")
                                    c = gr.Textbox(val or "", **common)
                                field_comps[fname] = c
                        extra_method = gr.Textbox("", label="More method options (YAML)", lines=2,
                                                  placeholder="e.g. rank_pattern: {query: 4}", elem_id="method-extra")
                        with gr.Group():
                            with gr.Row():
                                ds_source = gr.Radio(["bundled", "upload"], value="bundled", label="Dataset",
                                                     elem_id="ds-source")
                                ds_name = gr.Dropdown(list(BUNDLED_DATASETS), value="demo-sentiment",
                                                      label="Bundled dataset", elem_id="ds-name")
                                max_rows = gr.Number(0, label="max rows (0 = all)", precision=0, minimum=0,
                                                     elem_id="max-rows")
                            upload = gr.File(label="Upload CSV / JSONL / Parquet",
                                             file_types=[".csv", ".jsonl", ".parquet"], visible=False,
                                             elem_id="upload")
                            upload_path = gr.Textbox(visible=False, elem_id="upload-path")
                            with gr.Row(visible=False) as colmap:
                                col_kw = dict(choices=[], allow_custom_value=True, elem_classes=["colmap"])
                                text_col = gr.Dropdown(label="text column", elem_id="text-col", **col_kw)
                                label_col = gr.Dropdown(label="label column", elem_id="label-col", **col_kw)
                                prompt_col = gr.Dropdown(label="prompt column", elem_id="prompt-col", **col_kw)
                                response_col = gr.Dropdown(label="response column", elem_id="response-col", **col_kw)
                            preview = gr.Dataframe(label="First rows", interactive=False, elem_id="preview",
                                                   max_height=220, wrap=True)
                        with gr.Row():
                            max_steps = gr.Number(30, label="max steps", precision=0, minimum=1, elem_id="max-steps")
                            batch = gr.Number(8, label="batch size", precision=0, minimum=1, elem_id="batch")
                            lr = gr.Number(5e-4, label="learning rate", elem_id="lr")
                            seq = gr.Number(64, label="max seq len", precision=0, minimum=8, elem_id="seq")
                            eval_every = gr.Number(10, label="eval every", precision=0, minimum=0,
                                                   elem_id="eval-every")
                            seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                        with gr.Row():
                            preview_btn = gr.Button("Preview config", elem_id="preview-config")
                            launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
                        with gr.Row():
                            sweep_text = gr.Textbox(label="Sweep", placeholder="r: 4, 8, 16  ·  method: lora, dora  ·  "
                                                    "learning_rate: 1e-4, 5e-4", elem_id="sweep", scale=3)
                            sweep_btn = gr.Button("Launch sweep", elem_id="launch-sweep", scale=1)
                        launch_msg = gr.Markdown("", elem_id="launch-msg")
                        config_yaml = gr.Code(language="yaml", label="Config (what `peft-studio train` would run)",
                                              visible=False, elem_id="config-yaml")
                    with gr.Column(scale=2):
                        with gr.Row():
                            formula = gr.Radio(["model", "appendix", "slide"], value="model", label="Formula",
                                               elem_id="formula")
                            dtype = gr.Radio(["fp32", "bf16", "fp16"], value="fp32", label="Precision",
                                             elem_id="dtype")
                        with gr.Row():
                            gpu = gr.Dropdown(gpu_choices([]), value=str(int(GPU_PRESETS[DEFAULT_GPU])), label="GPU",
                                              elem_id="gpu")
                            quant = gr.Radio(["none", "nf4", "nf4-dq"], value="none", label="Base weights",
                                             elem_id="quant")
                        est_plot = gr.Plot(label="Memory estimate", elem_id="estimate-plot")
                        est_md = gr.Markdown(elem_id="estimate-text")

            # ====================================================== Runs
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                with gr.Row():
                    run_filter = gr.Textbox(label="Filter", placeholder="words in any column", elem_id="runs-filter",
                                            scale=3)
                    status_filter = gr.Dropdown(STATUS_FILTERS, value="all", label="Status", elem_id="runs-status",
                                                scale=1)
                    sort_by = gr.Dropdown(RUN_COLUMNS, value="id", label="Sort by", elem_id="runs-sort", scale=1)
                    sort_desc = gr.Checkbox(True, label="descending", elem_id="runs-desc", scale=1)
                runs_df = gr.Dataframe(headers=RUN_COLUMNS, value=None, interactive=False, label="Runs (live; click a row)",
                                       elem_id="runs-table", max_height=320, wrap=False)
                with gr.Row(elem_classes=["runs-actions"]):
                    run_id = gr.Number(label="Selected run id", precision=0, elem_id="run-id", scale=1)
                    cancel_btn = gr.Button("Cancel", elem_id="cancel", variant="stop")
                    resume_btn = gr.Button("Resume", elem_id="resume")
                    up_btn = gr.Button("Priority ↑", elem_id="priority-up")
                    down_btn = gr.Button("Priority ↓", elem_id="priority-down")
                    clone_btn = gr.Button("Clone into Launch", elem_id="clone")
                    delete_btn = gr.Button("Delete", elem_id="delete")
                    dl_btn = gr.DownloadButton("Download adapter", value=None, interactive=False,
                                               elem_id="download-adapter")
                    merged_btn = gr.Button("Build merged model", elem_id="build-merged", interactive=False)
                merged_file = gr.File(label="Merged model zip", interactive=False, visible=False,
                                      elem_id="merged-file")
                run_md = gr.Markdown(elem_id="run-status")
                with gr.Row():
                    loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
                    eval_plot = gr.Plot(label="Validation", elem_id="eval-plot")
                with gr.Row():
                    run_cfg = gr.Code(language="yaml", label="Config", elem_id="run-config")
                    run_logs = gr.Textbox(label="Log", lines=14, max_lines=14, interactive=False, elem_id="run-log",
                                          autoscroll=True)
                table_sig = gr.State(None)
                run_sig = gr.State(None)
                workers_md = gr.Markdown(elem_id="workers")

            # ====================================================== Compare
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                with gr.Row():
                    cmp_runs = gr.Dropdown([], multiselect=True, label="Runs to compare (two or more)",
                                           elem_id="compare-runs", scale=4)
                    cmp_x = gr.Radio(list(compare.X_AXES), value="step", label="x axis", elem_id="compare-x", scale=2)
                    cmp_refresh = gr.Button("Refresh", elem_id="compare-refresh", scale=1)
                cmp_msg = gr.Markdown(elem_id="compare-msg")
                with gr.Row():
                    cmp_loss = gr.Plot(label="Loss", elem_id="compare-loss")
                    cmp_eval = gr.Plot(label="Validation metric", elem_id="compare-eval")
                with gr.Row():
                    cmp_tradeoff = gr.Plot(label="Metric vs trainable parameters", elem_id="compare-tradeoff")
                    cmp_memory = gr.Plot(label="Memory", elem_id="compare-memory")
                with gr.Row():
                    cmp_speed = gr.Plot(label="Throughput", elem_id="compare-speed")
                    cmp_size = gr.Plot(label="Adapter size", elem_id="compare-size")
                cmp_table = gr.Dataframe(headers=compare.TABLE_COLUMNS, interactive=False, label="Side by side",
                                         elem_id="compare-table", wrap=True)
                cmp_csv = gr.DownloadButton("Download table (CSV)", value=None, interactive=False,
                                            elem_id="compare-csv")
                cmp_diff = gr.Checkbox(True, label="differences only", elem_id="compare-diff")
                cmp_cfg = gr.Dataframe(interactive=False, label="Configs", elem_id="compare-config", wrap=True)
                with gr.Group(visible=False) as sim_group:
                    gr.Markdown("**Subspace similarity of the two LoRA adapters' A matrices** "
                                "(Hu et al. 2021, Sec. 7.2): φ(i, j) = ‖U_i^T U_j‖²_F / min(i, j)")
                    sim_module = gr.Dropdown([], label="module", elem_id="similarity-module")
                    sim_plot = gr.Plot(label="Subspace similarity", elem_id="similarity-plot")
                sim_data = gr.State({})

            # ====================================================== Playground
            with gr.Tab("Playground", id="playground", elem_id="tab-playground"):
                with gr.Row():
                    pg_run = gr.Dropdown([], label="Finished run", elem_id="pg-run", scale=3)
                    pg_tokens = gr.Slider(1, 128, value=32, step=1, label="new tokens (causal LM)",
                                          elem_id="pg-tokens", scale=2)
                    pg_refresh = gr.Button("Refresh", elem_id="pg-refresh", scale=1)
                pg_text = gr.Textbox(label="Text / prompt", lines=3, elem_id="pg-text",
                                     placeholder="a film that stays with you long after it ends")
                pg_btn = gr.Button("Run base and adapter", variant="primary", elem_id="pg-go")
                pg_msg = gr.Markdown(elem_id="pg-msg")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Base model**")
                        pg_base_label = gr.Label(num_top_classes=5, label="base", elem_id="pg-base-label")
                        pg_base_text = gr.Textbox(label="base", lines=6, visible=False, elem_id="pg-base-text")
                    with gr.Column():
                        gr.Markdown("**With the adapter**")
                        pg_ad_label = gr.Label(num_top_classes=5, label="adapter", elem_id="pg-adapter-label")
                        pg_ad_text = gr.Textbox(label="adapter", lines=6, visible=False, elem_id="pg-adapter-text")
        timer = gr.Timer(2.0)

        form_comps = [run_name, model, task, method, extra_method, ds_source, ds_name, upload_path, text_col,
                      label_col, prompt_col, response_col, max_rows, max_steps, batch, lr, seq, eval_every, seed]
        form_comps += [field_comps[k] for k in method_keys]
        fields_list = [field_comps[k] for k in method_keys]

        # ---------------------------------------------------------- Launch events
        def on_model(m, mname):
            upd = [gr.update(value=DEFAULT_TASK[m]) if m in DEFAULT_TASK else gr.update()]
            is_cls = DEFAULT_TASK.get(m) == "classification"
            upd.append(gr.update(value="demo-sentiment" if is_cls else "demo-instruct") if m in DEFAULT_TASK
                       else gr.update())
            tm = field_default(mname, "target_modules", m) if "target_modules" in method_fields(mname) else None
            upd.append(gr.update(value=tm) if tm is not None else gr.update())
            return upd
        model.input(on_model, [model, method], [task, ds_name, field_comps["target_modules"]])

        def on_method(mname, m):
            fs = method_fields(mname)
            out = [method_help(mname)]
            for fname in method_keys:
                if fname not in fs:
                    out.append(gr.update(visible=False))
                    continue
                kw: dict[str, Any] = {"visible": True, "value": field_default(mname, fname, m)}
                if METHOD_FIELDS[fname] == "choice":
                    kw["choices"] = field_choices(mname, fname)
                out.append(gr.update(**kw))
            return out
        method.input(on_method, [method, model], [method_md] + fields_list)

        def on_source(src):
            up = src == "upload"
            return gr.update(visible=not up), gr.update(visible=up), gr.update(visible=up)
        ds_source.change(on_source, ds_source, [ds_name, upload, colmap])

        def on_upload(f, request: gr.Request):
            if f is None:
                return ["", None, ""] + [gr.update()] * 4
            path = f if isinstance(f, str) else getattr(f, "name", None)
            try:
                info = service.save_upload(settings, os.path.basename(path), path, owner=who(request))
            except service.SubmitError as e:
                return ["", None, f"✗ {e}"] + [gr.update()] * 4
            cols = info["columns"]

            def guess(*names):
                return next((c for c in cols if c.lower() in names), None)
            return [info["path"], preview_frame(info["preview"]),
                    f"Uploaded **{info['name']}**: {info['rows']} rows; columns: {', '.join(cols)}",
                    gr.update(choices=cols, value=guess("text", "sentence", "content")),
                    gr.update(choices=cols, value=guess("label", "labels", "target", "class")),
                    gr.update(choices=cols, value=guess("prompt", "instruction", "question", "input")),
                    gr.update(choices=cols, value=guess("response", "output", "answer", "completion"))]
        upload.upload(on_upload, upload, [upload_path, preview, launch_msg, text_col, label_col, prompt_col,
                                          response_col])

        def on_bundled(name):
            from engine.data import read_bundled
            try:
                return preview_frame(read_bundled(name, "train")[:5])
            except Exception:
                return None
        ds_name.change(on_bundled, ds_name, preview)

        def on_preview(*vals):
            try:
                cfg = service.validate_config(build_config(form_dict(list(vals), method_keys)), settings)
            except (service.SubmitError, ValueError) as e:
                return gr.update(visible=False), f"✗ {e}"
            return gr.update(value=cfg.to_yaml(), visible=True), "Config is valid."
        preview_btn.click(on_preview, form_comps, [config_yaml, launch_msg])

        def on_launch(*vals, request: gr.Request = None):
            try:
                rid = service.submit_run(settings, build_config(form_dict(list(vals), method_keys)),
                                         owner=who(request))
            except (service.SubmitError, ValueError) as e:
                return f"✗ {e}", gr.update()
            return f"✓ Run **{rid}** queued — follow it in the Runs tab.", gr.update(value=rid)
        launch_btn.click(on_launch, form_comps, [launch_msg, run_id])

        def on_sweep(text, *vals, request: gr.Request = None):
            try:
                cfgs = sweep_configs(form_dict(list(vals), method_keys), text)
                for c in cfgs:   # validate all before queuing any
                    service.validate_config(c, settings)
            except (service.SubmitError, ValueError) as e:
                return f"✗ {e}"
            ids = [service.submit_run(settings, c, owner=who(request)) for c in cfgs]
            return f"✓ Sweep queued {len(ids)} runs: " + ", ".join(f"**{i}**" for i in ids)
        sweep_btn.click(on_sweep, [sweep_text] + form_comps, launch_msg)

        def on_estimate(m, t, mname, extra, b, s, f, g, d, q, *fvals):
            fields = dict(zip(method_keys, fvals))
            return estimate_view(m, t, mname, fields, extra, b, s, f, g, d, q,
                                 gpu_name=gpu_label(g, service.list_workers(settings)) if g else "")
        est_inputs = [model, task, method, extra_method, batch, seq, formula, gpu, dtype, quant] + fields_list
        gr.on([c.change for c in est_inputs], on_estimate, est_inputs, [est_plot, est_md],
              show_progress="hidden", trigger_mode="always_last")

        def on_load_launch(ds):
            return gr.update(choices=gpu_choices(service.list_workers(settings))), on_bundled(ds)
        demo.load(on_load_launch, ds_name, [gpu, preview]).then(on_estimate, est_inputs, [est_plot, est_md])

        # ---------------------------------------------------------- Runs events
        def table_rows(request, q, st, sb, desc):
            return filter_sort(runs_table(settings, owner=visible_owner(request)), q, st, sb, desc)

        def details(rid, request):
            """(run, outputs for the detail widgets) of run `rid`, or a message."""
            if not rid:
                return None, ["Select a run in the table (or type its id).", None, None, "", ""]
            try:
                run = service.get_run(settings, int(rid))
            except service.NotFound as e:
                return None, [f"✗ {e}", None, None, "", ""]
            if not may_see(run, request):
                return None, [f"✗ run {int(rid)} not found", None, None, "", ""]
            metrics = service.get_metrics(settings, int(rid))
            label = f"run {run['id']}"
            metric_name = run.get("metric_name") or ("accuracy" if run["task"] == "classification" else "eval_loss")
            return run, [run_status_md(run, metrics), charts.loss_curves({label: metrics}),
                         charts.eval_curves({label: metrics}, metric_name),
                         yaml.safe_dump(run["config"], sort_keys=False), run_log(run, metrics)]

        def action_updates(run):
            has_adapter = bool(run and run.get("adapter"))
            path = None
            if has_adapter:
                try:
                    data, name = service.get_adapter(settings, run["id"])
                    path = write_download(data, name)
                except service.NotFound:
                    path = None
            mergeable = bool(run and has_adapter and METHODS.get(run["method"]) and METHODS[run["method"]].mergeable)
            return [gr.update(value=path, interactive=path is not None),
                    gr.update(interactive=mergeable)]

        detail_outs = [run_md, loss_plot, eval_plot, run_cfg, run_logs]

        def show_run(rid, q, st, sb, desc, request: gr.Request = None):
            """Full refresh: the table, the selected run's details and actions."""
            rows = table_rows(request, q, st, sb, desc)
            run, outs = details(rid, request)
            return [rows, repr(rows), run_signature(run)] + outs + action_updates(run) + [gr.update(visible=False)]
        run_outs = [runs_df, table_sig, run_sig] + detail_outs + [dl_btn, merged_btn, merged_file]
        view_inputs = [run_id, run_filter, status_filter, sort_by, sort_desc]
        run_id.change(show_run, view_inputs, run_outs).then(lambda r: r, run_id, selected_store)
        for c in (run_filter, status_filter, sort_by, sort_desc):
            c.change(show_run, view_inputs, run_outs, show_progress="hidden")

        def on_tick(rid, q, st, sb, desc, tsig, rsig, request: gr.Request = None):
            """Poll the database; send only what changed (keeps the table's scroll and selection)."""
            rows = table_rows(request, q, st, sb, desc)
            sig = repr(rows)
            out = [rows if sig != tsig else gr.skip(), sig]
            run = None
            if rid:
                try:
                    run = service.get_run(settings, int(rid))
                except service.NotFound:
                    run = None
            if run is not None and run_signature(run) == rsig:
                return out + [gr.skip()] * (1 + len(detail_outs) + 3)
            run, dets = details(rid, request)
            return out + [run_signature(run)] + dets + action_updates(run) + [gr.skip()]
        timer.tick(on_tick, view_inputs + [table_sig, run_sig], run_outs, show_progress="hidden")

        def on_select(evt: gr.SelectData):
            row = evt.row_value or []
            try:
                return int(row[0])
            except (TypeError, ValueError, IndexError):
                return gr.skip()
        runs_df.select(on_select, None, run_id)

        def restore_selection(saved):
            return saved if saved else gr.skip()
        demo.load(restore_selection, selected_store, run_id)
        demo.load(show_run, view_inputs, run_outs)

        def run_action(rid, request, action):
            """Cancel / resume / reprioritize the selected run; the service's error is the message."""
            if not rid:
                return "Select a run first."
            try:
                run = service.get_run(settings, int(rid))
                if not may_see(run, request):
                    raise service.NotFound(f"run {int(rid)} not found")
                if action == "cancel":
                    st = service.cancel_run(settings, int(rid))
                    return f"Run {int(rid)}: {st if st != 'running' else 'stopping at the next step'}"
                if action == "resume":
                    r = service.resume_run(settings, int(rid))
                    return f"Run {int(rid)} queued again; it continues from step {r['from_step']}."
                prio = max(-5, min(5, int(run.get("priority") or 0) + (1 if action == "up" else -1)))
                service.set_priority(settings, int(rid), prio)
                return f"Run {int(rid)}: priority {prio} (higher runs first)."
            except (service.NotFound, service.SubmitError) as e:
                return f"✗ {e}"

        def on_cancel(rid, request: gr.Request = None):
            return run_action(rid, request, "cancel")
        cancel_btn.click(on_cancel, run_id, run_md)

        def on_resume(rid, request: gr.Request = None):
            return run_action(rid, request, "resume")

        def on_up(rid, request: gr.Request = None):
            return run_action(rid, request, "up")

        def on_down(rid, request: gr.Request = None):
            return run_action(rid, request, "down")
        resume_btn.click(on_resume, run_id, run_md)
        up_btn.click(on_up, run_id, run_md)
        down_btn.click(on_down, run_id, run_md)

        def show_workers():
            ws = service.list_workers(settings)
            if not ws:
                return "**Workers:** none connected yet."
            gib = 1024 ** 3
            rows = "\n".join(f"| {w['name']} | {w['device']} | "
                              f"{(w['total_memory'] or 0) / gib:.1f} GiB | {(w['free_memory'] or 0) / gib:.1f} GiB | "
                              f"{w['heartbeat_at']} |" for w in ws)
            return ("**Connected workers**\n\n| worker | device | memory | free | last heartbeat (UTC) |\n"
                    "|---|---|---|---|---|\n" + rows)
        demo.load(show_workers, None, workers_md)
        gr.Timer(10.0).tick(show_workers, None, workers_md, show_progress="hidden")

        def on_delete(rid, request: gr.Request = None):
            if not rid:
                return "Select a run first.", gr.skip()
            try:
                run = service.get_run(settings, int(rid))
                if not may_see(run, request):
                    raise service.NotFound(f"run {int(rid)} not found")
                service.delete_run(settings, int(rid))
            except (service.NotFound, service.SubmitError) as e:
                return f"✗ {e}", gr.skip()
            return f"Run {int(rid)} deleted.", None
        delete_btn.click(on_delete, run_id, [run_md, run_id])

        def on_clone(rid, request: gr.Request = None):
            n = len(form_comps)
            try:
                run = service.get_run(settings, int(rid or 0))
                if not may_see(run, request):
                    raise service.NotFound(f"run {int(rid)} not found")
            except service.NotFound as e:
                return [gr.skip()] * (n + 3) + [f"✗ {e}"]
            form = form_from_config(run["config"])
            mname = form["method"]
            fs = method_fields(mname)
            ups = []
            for key in FORM_KEYS + method_keys:
                if key in METHOD_FIELDS:
                    val = form.get(key, field_default(mname, key, form["model"]) if key in fs else None)
                    kw: dict[str, Any] = {"visible": key in fs}
                    if key in fs:
                        kw["value"] = val
                        if METHOD_FIELDS[key] == "choice":
                            kw["choices"] = field_choices(mname, key)
                    ups.append(gr.update(**kw))
                else:
                    ups.append(gr.update(value=form.get(key)))
            return ups + [method_help(mname), gr.Tabs(selected="launch"),
                          f"Cloned run {run['id']}: edit and launch.", ""]
        clone_btn.click(on_clone, run_id, form_comps + [method_md, tabs, launch_msg, run_md])

        def on_merged(rid, request: gr.Request = None):
            from .artifacts import ArtifactError, merged_zip_path
            try:
                run = service.get_run(settings, int(rid or 0))
                if not may_see(run, request):
                    raise service.NotFound(f"run {int(rid)} not found")
                path, name = merged_zip_path(settings, int(rid))
            except (service.NotFound, ArtifactError, ValueError) as e:
                raise gr.Error(str(e))
            return gr.update(value=write_download(path.read_bytes(), name), visible=True)
        merged_btn.click(on_merged, run_id, merged_file)

        # ---------------------------------------------------------- Compare events
        def compare_choices(request: gr.Request = None):
            runs = service.list_runs(settings, owner=visible_owner(request))
            return gr.update(choices=run_choices(runs, statuses=("succeeded", "running", "failed", "cancelled")))
        cmp_refresh.click(compare_choices, None, cmp_runs)
        demo.load(compare_choices, None, cmp_runs)

        cmp_outs = [cmp_msg, cmp_loss, cmp_eval, cmp_tradeoff, cmp_memory, cmp_speed, cmp_size, cmp_table, cmp_csv,
                    cmp_cfg, sim_group, sim_module, sim_plot, sim_data]

        def on_compare(sel, x_axis, diff_only, request: gr.Request = None):
            ids = compare.parse_run_ids(sel)
            if visible_owner(request) is not None:
                ids = [i for i in ids if i in {r["id"] for r in service.list_runs(settings,
                                                                                   owner=visible_owner(request))}]
            if len(ids) < 2:
                e = charts.empty("", "pick two or more runs")
                return ["Pick two or more runs to compare.", e, e, e, e, e, e, None,
                        gr.update(value=None, interactive=False), None, gr.update(visible=False),
                        gr.update(choices=[], value=None), None, {}]
            v = compare_view(settings, ids, x_axis, diff_only)
            import pandas as pd
            table = pd.DataFrame(v["table"], columns=compare.TABLE_COLUMNS)
            cfg = pd.DataFrame(v["cfg_rows"], columns=v["cfg_header"]) if v["cfg_rows"] else \
                pd.DataFrame([["(no differences)"] + [""] * (len(v["cfg_header"]) - 1)], columns=v["cfg_header"])
            sim: dict = {}
            sim_msg = ""
            if v["lora_pair"]:
                a, b = v["lora_pair"]
                try:
                    sim = {"a": compare.run_label(a), "b": compare.run_label(b),
                           "phi": compare.subspace_similarity(settings, a["id"], b["id"])}
                except Exception as e:   # different base models, no shared module...
                    sim_msg = f"  \nSubspace similarity unavailable: {e}"
            mods = list(sim.get("phi", {}))
            heat = charts.similarity_heatmap(sim["phi"][mods[0]], mods[0], sim["a"], sim["b"]) if mods else None
            msg = f"Comparing {len(v['runs'])} runs." + sim_msg
            return [msg, v["loss"], v["eval"], v["tradeoff"], v["memory"], v["speed"], v["size"], table,
                    gr.update(value=v["csv"], interactive=bool(v["csv"])), cfg, gr.update(visible=bool(mods)),
                    gr.update(choices=mods, value=mods[0] if mods else None), heat, sim]
        for c in (cmp_runs, cmp_x, cmp_diff):
            c.change(on_compare, [cmp_runs, cmp_x, cmp_diff], cmp_outs)

        def on_module(mod, sim):
            if not mod or not sim or mod not in sim.get("phi", {}):
                return gr.skip()
            return charts.similarity_heatmap(sim["phi"][mod], mod, sim["a"], sim["b"])
        sim_module.change(on_module, [sim_module, sim_data], sim_plot)

        # ---------------------------------------------------------- Playground events
        def pg_choices(request: gr.Request = None):
            runs = service.list_runs(settings, owner=visible_owner(request), status="succeeded")
            ch = run_choices(runs)
            return gr.update(choices=ch, value=ch[0] if ch else None)
        pg_refresh.click(pg_choices, None, pg_run)
        demo.load(pg_choices, None, pg_run)

        def on_try(sel, text, n_tokens, request: gr.Request = None):
            from . import playground
            ids = compare.parse_run_ids([sel] if sel else [])
            if not ids:
                return ["Pick a finished run first."] + [gr.skip()] * 4
            try:
                run = service.get_run(settings, ids[0])
                if not may_see(run, request):
                    raise service.NotFound(f"run {ids[0]} not found")
                res = playground.try_run(settings, ids[0], text, int(n_tokens))
            except Exception as e:
                return [f"✗ {type(e).__name__}: {e}" if not isinstance(e, (ValueError, LookupError)) else f"✗ {e}"] \
                    + [gr.skip()] * 4
            if res["task"] == "classification":
                return [f"Run {ids[0]} · classification", gr.update(value=res["base"], visible=True),
                        gr.update(visible=False), gr.update(value=res["adapted"], visible=True),
                        gr.update(visible=False)]
            return [f"Run {ids[0]} · causal LM, greedy", gr.update(visible=False),
                    gr.update(value=res["base"], visible=True), gr.update(visible=False),
                    gr.update(value=res["adapted"], visible=True)]
        pg_btn.click(on_try, [pg_run, pg_text, pg_tokens], [pg_msg, pg_base_label, pg_base_text, pg_ad_label,
                                                            pg_ad_text])
    return demo
