"""The Gradio UI: Launch (config + live memory estimate), Runs (live progress,
download). Everything shown is read from the database; a reopened browser shows
the same state."""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import gradio as gr
import yaml

from engine.data import BUNDLED_DATASETS
from engine.methods import METHODS
from engine.models import BUNDLED_MODELS, TINY_MODELS
from workers.settings import Settings

from . import charts, service

log = logging.getLogger("peft_studio.ui")
GIB = 1024 ** 3
GPU_PRESETS = {"16 GB (T4, V100-16)": 16e9, "24 GB (RTX 4090, A10)": 24e9, "40 GB (A100-40)": 40e9,
               "48 GB (A6000, L40S)": 48e9, "80 GB (A100-80, H100)": 80e9}
MODEL_CHOICES = list(BUNDLED_MODELS) + list(TINY_MODELS)
DEFAULT_TASK = {"minilm": "classification", "tiny-bert": "classification", "smollm2-135m": "causal_lm",
                "tiny-llama": "causal_lm"}
DEFAULT_TARGETS = {"minilm": "query,value", "tiny-bert": "query,value", "smollm2-135m": "q_proj,v_proj",
                   "tiny-llama": "q_proj,v_proj"}
RUN_COLUMNS = ["id", "name", "model", "method", "rank", "status", "trainable %", "best metric",
               "est. peak GiB", "measured peak GiB", "tokens/s", "duration s", "owner"]


def parse_targets(text: str):
    """`all-linear`, `re:<regex>`, or comma-separated module name suffixes."""
    t = text.strip()
    if t == "all-linear":
        return t
    if t.startswith("re:"):
        return t[3:]
    return [x.strip() for x in t.split(",") if x.strip()]


def method_fields(name: str) -> set[str]:
    spec = METHODS.get(name)
    return set(spec.config_cls.model_fields) if spec else set()


def method_help(name: str) -> str:
    spec = METHODS.get(name)
    if not spec:
        return ""
    merge = "mergeable into the base weights" if spec.mergeable else "not mergeable"
    return f"**{spec.name}** — {spec.summary} Trains: {spec.trains}; {merge}.  \n_{spec.paper}_"


def build_config(name, model, task, method, r, alpha, dropout, targets, extra_method, ds_source, ds_name,
                 upload_path, text_col, label_col, prompt_col, response_col, max_steps, batch, lr, seq, eval_every,
                 seed) -> dict:
    """The run config dict from the form (validated later by the same schema as REST/CLI)."""
    fields = method_fields(method)
    m: dict[str, Any] = {"name": method}
    if "r" in fields and r:
        m["r"] = int(r)
    if "alpha" in fields and alpha:
        m["alpha"] = float(alpha)
    if "dropout" in fields and dropout is not None:
        m["dropout"] = float(dropout)
    if "target_modules" in fields and targets and targets.strip():
        t = targets.strip()
        m["target_modules"] = parse_targets(t)
    if extra_method and extra_method.strip():
        try:
            extra = yaml.safe_load(extra_method)
        except yaml.YAMLError as e:
            raise service.SubmitError(f"method options: not valid YAML: {e}") from None
        if not isinstance(extra, dict):
            raise service.SubmitError("method options: must be a mapping like `k: 2`")
        m.update(extra)
    if ds_source == "upload":
        if not upload_path:
            raise service.SubmitError("dataset: upload a file first (CSV, JSONL or Parquet)")
        ds: dict[str, Any] = {"path": upload_path}
        for k, v in (("text_column", text_col), ("label_column", label_col), ("prompt_column", prompt_col),
                     ("response_column", response_col)):
            if v and v.strip():
                ds[k] = v.strip()
    else:
        ds = {"name": ds_name}
    return {"name": (name or "").strip() or f"{model}-{method}" + (f"-r{int(r)}" if "r" in m else ""),
            "model": (model or "").strip(), "task": task, "dataset": ds, "method": m,
            "training": {"max_steps": int(max_steps), "batch_size": int(batch), "learning_rate": float(lr),
                         "max_seq_len": int(seq), "eval_every": int(eval_every), "seed": int(seed)}}


def estimate_view(model, task, method, r, targets, batch, seq, formula, gpu, dtype) -> tuple:
    from engine.estimator import estimate, gpu_fits, largest_batch_that_fits

    m: dict[str, Any] = {"name": method}
    fields = method_fields(method)
    if "r" in fields and r:
        m["r"] = int(r)
    if "target_modules" in fields and targets and targets.strip():
        m["target_modules"] = parse_targets(targets)
    kw = dict(seq_len=int(seq), dtype=dtype, formula=formula, task=task)
    try:
        est = estimate(model, m, batch_size=int(batch), **kw)
    except Exception as e:
        return charts.memory_bar({}, title="no estimate"), f"⚠️ Estimate unavailable: {e}"
    d = est.to_json()
    gpu_bytes = int(GPU_PRESETS.get(gpu, 0)) or None
    fits = ""
    if gpu_bytes:
        ok = d["rows"]["total"] <= gpu_bytes
        try:
            best = largest_batch_that_fits(gpu_bytes, model=model, method=m, **kw)
        except Exception:
            best = None
        fits = (f"**{'✅ fits' if ok else '❌ does not fit'}** on {gpu}"
                + (f" · largest batch that fits: **{best}**" if best is not None else ""))
    rows = "  \n".join(f"{charts.ROW_LABELS[k]}: {v / GIB:.3f} GiB" for k, v in d["rows"].items()
                       if k in charts.ROW_LABELS)
    text = (f"**Total: {d['rows']['total'] / GIB:.3f} GiB** ({formula} formula)  \n{fits}  \n"
            f"Trainable: **{d['n_trainable']:,}** of {d['n_params']:,} parameters "
            f"(**{100 * d['n_trainable'] / max(1, d['n_params']):.4f}%**)  \n{rows}")
    return charts.memory_bar(d["rows"], gpu_bytes, gpu, title=f"{model} · {method}"), text


def runs_table(settings: Settings, owner: Optional[str] = None) -> list[list]:
    out = []
    for r in service.list_runs(settings, owner=owner):
        tr = (100 * r["n_trainable"] / r["n_params"]) if r.get("n_params") and r.get("n_trainable") else None
        out.append([r["id"], r["name"], r["model"], r["method"], r["rank"], r["status"],
                    None if tr is None else round(tr, 4),
                    None if r["best_metric"] is None else round(r["best_metric"], 4),
                    None if not r["estimated_peak_bytes"] else round(r["estimated_peak_bytes"] / GIB, 3),
                    None if not r["measured_peak_bytes"] else round(r["measured_peak_bytes"] / GIB, 3),
                    None if r["tokens_per_s"] is None else round(r["tokens_per_s"], 1),
                    None if r["duration_s"] is None else round(r["duration_s"], 1), r["owner"]])
    return out


def fmt_eta(s: Optional[float]) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_status_md(run: dict, metrics: list[dict]) -> str:
    last = metrics[-1] if metrics else {}
    evals = [m for m in metrics if m.get("eval")]
    ev = ", ".join(f"{k} {v:.4f}" for k, v in (evals[-1]["eval"] if evals else {}).items())
    lines = [f"### Run {run['id']} · {run['name']} — `{run['status']}`",
             f"step **{run['steps_done']}** / {run['max_steps'] or '?'} · loss **"
             f"{last.get('loss', float('nan')):.4f}**" if last else f"step 0 / {run['max_steps'] or '?'}",
             f"tokens/s **{last.get('tokens_per_s', 0):.1f}** · ETA **{fmt_eta(last.get('eta_s'))}**" if last else "",
             f"validation: {ev}" if ev else "",
             f"worker: {run['worker_host'] or '–'} · device: {run['device'] or '–'}",
             f"trainable: {run['n_trainable']:,} / {run['n_params']:,}" if run.get("n_params") else ""]
    if run.get("error") and run["status"] in ("failed", "cancelled"):
        lines.append(f"**{'Error' if run['status'] == 'failed' else 'Note'}:** {run['error']}")
    return "  \n".join(x for x in lines if x)


def build_ui(settings: Settings, user_of=None) -> gr.Blocks:
    """The Blocks app. `user_of(request) -> Optional[str]` names the logged-in user."""

    def who(request: gr.Request | None) -> Optional[str]:
        if user_of is None or request is None:
            return None
        return user_of(request)

    with gr.Blocks(title="PEFT Studio", analytics_enabled=False) as demo:
        gr.Markdown("# PEFT Studio\nPick a model, a PEFT method and its size; see the memory it needs; "
                    "launch; watch; compare; download an adapter that Hugging Face `peft` loads as-is.")
        with gr.Tab("Launch", id="launch"):
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
                    with gr.Row():
                        r = gr.Slider(1, 256, value=8, step=1, label="Rank r", elem_id="rank")
                        alpha = gr.Number(16, label="alpha", elem_id="alpha")
                        dropout = gr.Number(0.0, label="dropout", minimum=0, maximum=0.99, elem_id="dropout")
                    targets = gr.Textbox("query,value", label="Target modules",
                                         info="comma-separated suffixes, a regex, or all-linear", elem_id="targets")
                    extra_method = gr.Textbox("", label="More method options (YAML)", lines=2,
                                              placeholder="e.g. init: gaussian", elem_id="method-extra")
                    with gr.Group():
                        ds_source = gr.Radio(["bundled", "upload"], value="bundled", label="Dataset",
                                             elem_id="ds-source")
                        ds_name = gr.Dropdown(list(BUNDLED_DATASETS), value="demo-sentiment", label="Bundled dataset",
                                              elem_id="ds-name")
                        upload = gr.File(label="Upload CSV / JSONL / Parquet", file_types=[".csv", ".jsonl", ".parquet"],
                                         visible=False, elem_id="upload")
                        upload_path = gr.Textbox(visible=False, elem_id="upload-path")
                        with gr.Row(visible=False) as colmap:
                            text_col = gr.Textbox(label="text column", elem_id="text-col")
                            label_col = gr.Textbox(label="label column", elem_id="label-col")
                            prompt_col = gr.Textbox(label="prompt column", elem_id="prompt-col")
                            response_col = gr.Textbox(label="response column", elem_id="response-col")
                        preview = gr.Dataframe(label="First rows", interactive=False, elem_id="preview")
                    with gr.Row():
                        max_steps = gr.Number(30, label="max steps", precision=0, minimum=1, elem_id="max-steps")
                        batch = gr.Number(8, label="batch size", precision=0, minimum=1, elem_id="batch")
                        lr = gr.Number(5e-4, label="learning rate", elem_id="lr")
                        seq = gr.Number(64, label="max seq len", precision=0, minimum=8, elem_id="seq")
                        eval_every = gr.Number(10, label="eval every", precision=0, minimum=0, elem_id="eval-every")
                        seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    with gr.Row():
                        preview_btn = gr.Button("Preview config", elem_id="preview-config")
                        launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
                    launch_msg = gr.Markdown("", elem_id="launch-msg")
                    config_yaml = gr.Code(language="yaml", label="Config (what `peft-studio train` would run)",
                                          visible=False, elem_id="config-yaml")
                with gr.Column(scale=2):
                    with gr.Row():
                        formula = gr.Radio(["model", "appendix", "slide"], value="model", label="Formula",
                                           elem_id="formula")
                        dtype = gr.Radio(["fp32", "bf16", "fp16"], value="fp32", label="Precision", elem_id="dtype")
                    gpu = gr.Dropdown(list(GPU_PRESETS), value="24 GB (RTX 4090, A10)", label="GPU", elem_id="gpu")
                    est_plot = gr.Plot(label="Memory estimate", elem_id="estimate-plot")
                    est_md = gr.Markdown(elem_id="estimate-text")

        with gr.Tab("Runs", id="runs"):
            runs_df = gr.Dataframe(headers=RUN_COLUMNS, value=lambda: runs_table(settings), interactive=False,
                                   label="Runs (live)", elem_id="runs-table")
            with gr.Row():
                run_id = gr.Number(label="Run id", precision=0, elem_id="run-id")
                cancel_btn = gr.Button("Cancel", elem_id="cancel")
                dl_btn = gr.Button("Download adapter", elem_id="download")
            dl_file = gr.File(label="Adapter zip", interactive=False, elem_id="adapter-file")
            run_md = gr.Markdown(elem_id="run-status")
            with gr.Row():
                loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
                eval_plot = gr.Plot(label="Validation", elem_id="eval-plot")
            run_cfg = gr.Code(language="yaml", label="Config", elem_id="run-config")
        timer = gr.Timer(2.0)

        # ---------------------------------------------------------- Launch events
        def on_model(m):
            return (gr.update(value=DEFAULT_TASK.get(m, "causal_lm")),
                    gr.update(value=DEFAULT_TARGETS.get(m, "")),
                    gr.update(value="demo-sentiment" if DEFAULT_TASK.get(m) == "classification" else "demo-instruct"))
        model.change(on_model, model, [task, targets, ds_name])

        def on_method(mname):
            f = method_fields(mname)
            return (method_help(mname), gr.update(visible="r" in f), gr.update(visible="alpha" in f),
                    gr.update(visible="dropout" in f), gr.update(visible="target_modules" in f))
        method.change(on_method, method, [method_md, r, alpha, dropout, targets])

        def on_source(src):
            up = src == "upload"
            return gr.update(visible=not up), gr.update(visible=up), gr.update(visible=up)
        ds_source.change(on_source, ds_source, [ds_name, upload, colmap])

        def on_upload(f, request: gr.Request):
            if f is None:
                return "", None, ""
            path = f if isinstance(f, str) else getattr(f, "name", None)
            import os
            try:
                info = service.save_upload(settings, os.path.basename(path), path, owner=who(request))
            except service.SubmitError as e:
                return "", None, f"❌ {e}"
            return (info["path"], info["preview"],
                    f"Uploaded **{info['name']}**: {info['rows']} rows; columns: {', '.join(info['columns'])}")
        upload.upload(on_upload, upload, [upload_path, preview, launch_msg])

        def on_bundled(name):
            from engine.data import read_bundled
            try:
                return read_bundled(name, "train")[:5]
            except Exception:
                return None
        ds_name.change(on_bundled, ds_name, preview)

        form = [run_name, model, task, method, r, alpha, dropout, targets, extra_method, ds_source, ds_name,
                upload_path, text_col, label_col, prompt_col, response_col, max_steps, batch, lr, seq, eval_every,
                seed]

        def on_preview(*vals):
            try:
                cfg = service.validate_config(build_config(*vals))
            except service.SubmitError as e:
                return gr.update(visible=False), f"❌ {e}"
            return gr.update(value=cfg.to_yaml(), visible=True), ""
        preview_btn.click(on_preview, form, [config_yaml, launch_msg])

        def on_launch(*vals, request: gr.Request = None):
            try:
                rid = service.submit_run(settings, build_config(*vals), owner=who(request))
            except service.SubmitError as e:
                return f"❌ {e}", gr.update()
            return f"✅ Run **{rid}** queued — follow it in the Runs tab.", gr.update(value=rid)
        launch_btn.click(on_launch, form, [launch_msg, run_id])

        est_inputs = [model, task, method, r, targets, batch, seq, formula, gpu, dtype]
        for comp in est_inputs:
            comp.change(estimate_view, est_inputs, [est_plot, est_md], show_progress="hidden")
        demo.load(estimate_view, est_inputs, [est_plot, est_md])
        demo.load(on_bundled, ds_name, preview)

        # ---------------------------------------------------------- Runs events
        def show_run(rid, request: gr.Request = None):
            owner = who(request)
            table = runs_table(settings, owner=owner)
            if not rid:
                rid = table[0][0] if table else None
            if not rid:
                return table, "No runs yet.", None, None, ""
            try:
                run = service.get_run(settings, int(rid))
            except service.NotFound as e:
                return table, f"❌ {e}", None, None, ""
            if owner is not None and run.get("owner") not in (owner,) and not getattr(user_of, "is_admin",
                                                                                        lambda _u: False)(owner):
                return table, f"❌ run {rid} not found", None, None, ""
            metrics = service.get_metrics(settings, int(rid))
            label = f"run {run['id']}"
            metric_name = run.get("metric_name") or ("accuracy" if run["task"] == "classification" else "eval_loss")
            return (table, run_status_md(run, metrics), charts.loss_curves({label: metrics}),
                    charts.eval_curves({label: metrics}, metric_name),
                    yaml.safe_dump(run["config"], sort_keys=False))
        outs = [runs_df, run_md, loss_plot, eval_plot, run_cfg]
        timer.tick(show_run, run_id, outs, show_progress="hidden")
        run_id.change(show_run, run_id, outs)
        demo.load(show_run, run_id, outs)

        def on_cancel(rid):
            if not rid:
                return "Pick a run id first."
            try:
                st = service.cancel_run(settings, int(rid))
            except service.NotFound as e:
                return f"❌ {e}"
            return f"Run {int(rid)}: {st if st != 'running' else 'stopping at the next step'}"
        cancel_btn.click(on_cancel, run_id, run_md)

        def on_download(rid):
            import os
            import tempfile
            if not rid:
                return None
            try:
                data, name = service.get_adapter(settings, int(rid))
            except service.NotFound as e:
                raise gr.Error(str(e))
            d = tempfile.mkdtemp(prefix="adapter-")
            path = os.path.join(d, name)
            with open(path, "wb") as f:
                f.write(data)
            return path
        dl_btn.click(on_download, run_id, dl_file)
    return demo
