"""The Launch tab: the run form (method controls come from the method's config
class), dataset upload and preview, sweeps, and the live memory estimate."""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from engine.config import TrainingConfig
from engine.data import BUNDLED_DATASETS
from engine.estimator import GPU_PRESETS
from engine.methods import METHODS

from .. import charts, checks, service
from .common import GIB, Ctx
from .forms import (DEFAULT_DATASET, DEFAULT_EVAL_GENERATE, DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_OPTIMIZER,
                    DEFAULT_STEPS,
                    FORM_KEYS, METHOD_FIELDS, MODEL_CHOICES, OPTIMIZERS, STRATEGIES, WANDB_MODES, build_config,
                    build_method, default_dataset, default_lr, default_metric, default_task, distributed_of,
                    field_choices,
                    field_default, form_from_config, method_fields, method_help, metric_choices, optimizer_of,
                    sweep_configs)
from .forms import add_task as add_task_entry

DEFAULT_GPU = next(b for name, b in GPU_PRESETS if name.startswith("24 GB"))
CPU = "cpu"      # the device menu's value for "estimate for this machine's CPU"
DEFAULT_GEN_TOKENS = TrainingConfig.model_fields["eval_generate_tokens"].default
EVAL_BOUND_TEXT = ("each evaluation scores at most 2,000 validation rows on a GPU; on a CPU a sixth of the rows "
                   "trained on (at least 32), so the final one takes about a tenth of the training time "
                   "(training.eval_max_rows / eval_full in YAML)")
MAX_BATCH_SHOWN = 4096
MAX_DEVICES_SHOWN = 1024


# ------------------------------------------------------------------ the estimate panel

def host_memory() -> int:
    """This machine's memory in bytes (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_label() -> str:
    mem = host_memory()
    return f"CPU (this machine{f', {mem / GIB:.0f} GiB' if mem else ''}; no CUDA context)"


def cuda_here(workers: list[dict]) -> bool:
    """Whether a CUDA device is in reach: a live worker reports one, or this process sees one."""
    if any((w.get("device") or "").startswith("cuda") for w in workers):
        return True
    import torch
    return torch.cuda.is_available()


def default_device(workers: list[dict]) -> str:
    """The device menu's first value: the 24 GB GPU preset where CUDA is in reach, else the CPU."""
    return str(int(DEFAULT_GPU)) if cuda_here(workers) else CPU


def gpu_choices(workers: list[dict]) -> list[tuple[str, str]]:
    """(label, value) for the device dropdown: this machine's CPU, the estimator's GPU presets
    (bytes as text), then every GPU a live worker reports."""
    out = [(cpu_label(), CPU)] + [(name, str(int(b))) for name, b in GPU_PRESETS]
    for w in workers:
        dev, total = w.get("device") or "", w.get("total_memory")
        if total and dev.startswith("cuda"):
            out.append((f"{w['name']}: {dev.removeprefix('cuda:')} ({total / 1e9:.0f} GB)", str(int(total))))
    return out


def gpu_label(value: str, workers: list[dict]) -> str:
    if value == CPU:
        return "CPU"
    return next((label for label, v in gpu_choices(workers) if v == str(value)), f"{int(value) / 1e9:.0f} GB")


def preview_frame(rows: list[dict]):
    """First rows of a dataset as a table (long text cut)."""
    import pandas as pd

    return pd.DataFrame([{k: (v[:120] + "…") if isinstance(v, str) and len(v) > 120 else v for k, v in r.items()}
                         for r in rows])


def devices_text(gpu_bytes: int, name: str, per_device_total: int, world_size: int, smallest: int | None,
                 strategy: str, fsdp_smallest: int | None = None) -> str:
    """'✓ fits on N × <GPU>' for the chosen device count, and the fewest such GPUs that hold the run."""
    where = f"{world_size} × {name}" if world_size > 1 else name
    out = f"**{'✓ fits' if per_device_total <= gpu_bytes else '✗ does not fit'}** on {where}"
    if smallest is None:
        return out
    if smallest:
        return out + f" · fewest devices that fit: **{smallest}** ({strategy})"
    if fsdp_smallest:
        return out + f" · no device count fits with {strategy}; fewest with fsdp: **{fsdp_smallest}**"
    return out + f" · no device count up to {MAX_DEVICES_SHOWN} fits ({strategy})"


def paged_text(optimizer: str, rows: dict) -> str:
    """The host-memory line of a paged optimizer: its states live in host memory and
    come onto the device one parameter at a time (engine.optim); '' otherwise."""
    if not optimizer.startswith("paged"):
        return ""
    return (f"  \nHost memory ({optimizer} states): **{rows['optimizer'] / GIB:.3f} GiB**; "
            f"the device total above still counts them, as the estimator does")


def estimate_view(model, task, method, fields: dict, extra_yaml, batch, seq, formula, gpu, dtype, quant,
                  gpu_name: str = "", world_size=1, strategy: str = "ddp",
                  optimizer: str = DEFAULT_OPTIMIZER) -> tuple:
    """(plotly figure, markdown) for the estimate panel, per device for `world_size`
    devices with `strategy`, with `optimizer`'s states; errors become a message, never an exception."""
    from engine.estimator import estimate, largest_batch_that_fits, smallest_world_size_that_fits

    on_cpu = gpu == CPU
    try:
        m = build_method(method, fields, extra_yaml or "")
        strategy, world = distributed_of({"strategy": strategy, "devices": world_size})
        optimizer = optimizer_of({"optimizer": optimizer})
        kw = dict(seq_len=int(seq), dtype=dtype, quant=quant, formula=formula, task=task, optimizer=optimizer,
                  device="cpu" if on_cpu else "cuda")
        est = estimate(model, m, batch_size=int(batch), world_size=world, strategy=strategy, **kw)
    except Exception as e:
        return charts.empty("Memory estimate", "no estimate"), f"⚠ Estimate unavailable: {e}"
    d = est.to_dict()
    counts = checks.parameter_counts(model, task, m)   # as the worker counts the run it trains
    if counts:
        d["n_params"], d["n_trainable"] = counts
        d["trainable_percent"] = 100 * counts[1] / counts[0] if counts[0] else 0.0
    gpu_bytes = (host_memory() or None) if on_cpu else (int(float(gpu)) if gpu else None)
    name = "CPU (this machine)" if on_cpu else gpu_name or (f"{gpu_bytes / 1e9:.0f} GB" if gpu_bytes else "")
    fits = ""
    if gpu_bytes:
        try:
            best = largest_batch_that_fits(gpu_bytes, model, m, max_batch=MAX_BATCH_SHOWN, world_size=world,
                                           strategy=strategy, **kw)
        except Exception:
            best = None
        smallest = fsdp_smallest = None
        try:
            args = dict(max_world_size=MAX_DEVICES_SHOWN, batch_size=int(batch), **kw)
            smallest = smallest_world_size_that_fits(gpu_bytes, model, m, strategy=strategy, **args)
            if smallest == 0 and strategy != "fsdp":
                fsdp_smallest = smallest_world_size_that_fits(gpu_bytes, model, m, strategy="fsdp", **args)
        except Exception:
            pass
        best_text = "none" if best == 0 else (f"≥ {best}" if best == MAX_BATCH_SHOWN else str(best))
        fits = (devices_text(gpu_bytes, name, d["rows"]["total"], world, smallest, strategy, fsdp_smallest)
                + (f" · largest batch per device that fits: **{best_text}**" if best is not None else ""))
    rows = " · ".join(f"{charts.ROW_LABELS[k]} {v / GIB:.3f}" for k, v in d["rows"].items() if k in charts.ROW_LABELS)
    notes = "".join(f"  \n_note: {n}_" for n in d.get("notes", [])[:3])
    per = f"per device, {world} × {strategy}, " if world > 1 else ""
    where = ("estimated for the **CPU** (no CUDA context; no GPU is connected)" if on_cpu
             else "estimated for a **CUDA** GPU")
    only = f"  \n_{model} is in the catalog only: estimate, not train_" if checks.is_estimate_only(model) else ""
    text = (f"{where}{only}  \n"
            f"**Total: {d['rows']['total'] / GIB:.3f} GiB** ({per}{formula} formula, batch {int(batch)}, "
            f"seq {int(seq)}, {dtype}, {optimizer})  \n{fits}  \n"
            f"Trainable: **{d['n_trainable']:,}** of {d['n_params']:,} parameters "
            f"(**{d['trainable_percent']:.4f}%**)  \nGiB — {rows}{paged_text(optimizer, d['rows'])}{notes}")
    title = f"{model} · {method}" + (f" · per device of {world} ({strategy})" if world > 1 else "")
    return charts.memory_bar(d["rows"], gpu_bytes, name, title=title), text


def bundled_preview(name: str):
    from engine.data import read_bundled
    try:
        return preview_frame(read_bundled(name, "train")[:5])
    except Exception:
        return None


# ------------------------------------------------------------------ the tab

def method_control(fname: str, kind: str) -> gr.components.Component:
    """The control of one method-config field, set up for the default method."""
    vis = fname in method_fields(DEFAULT_METHOD)
    val = field_default(DEFAULT_METHOD, fname, DEFAULT_MODEL) if vis else None
    common = dict(label=fname, visible=vis, elem_id=f"mf-{fname}", min_width=150)
    if fname == "r":
        return gr.Slider(1, 256, value=val or 8, step=1, label="rank r", visible=vis, elem_id="rank", min_width=260)
    if kind == "int":
        return gr.Number(val, precision=0, **common)
    if kind == "float":
        return gr.Number(val, **common)
    if kind == "bool":
        return gr.Checkbox(bool(val), **common)
    if kind == "choice":
        owner = DEFAULT_METHOD if vis else next(n for n, s in METHODS.items() if fname in s.config_cls.model_fields)
        ch = field_choices(owner, fname)
        return gr.Dropdown(ch, value=val if vis else ch[0], **common)
    if fname == "target_modules":
        common.update(label="target modules", elem_id="targets", min_width=260,
                      info="comma-separated suffixes, re:<regex>, or all-linear")
    return gr.Textbox(val or "", **common)


class LaunchTab:
    """The Launch tab's components (built inside the current gr.Tab) and its events."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        with gr.Row():
            with gr.Column(scale=3):
                self._form_column()
            with gr.Column(scale=2):
                self._estimate_column()

    def _form_column(self) -> None:
        with gr.Row():
            self.model = gr.Dropdown(MODEL_CHOICES, value=DEFAULT_MODEL, label="Model", allow_custom_value=True,
                                     info="bundled model, local Hugging Face directory, or hub id", elem_id="model")
            self.task = gr.Radio(["classification", "causal_lm"], value=default_task(DEFAULT_MODEL), label="Task",
                                 elem_id="task")
        with gr.Row():
            self.method = gr.Dropdown(list(METHODS), value=DEFAULT_METHOD, label="Method", elem_id="method")
            self.run_name = gr.Textbox(label="Run name", placeholder="auto", elem_id="run-name")
        self.method_md = gr.Markdown(method_help(DEFAULT_METHOD), elem_id="method-help")
        with gr.Row(elem_id="method-fields"):
            self.fields = {fname: method_control(fname, kind) for fname, kind in METHOD_FIELDS.items()}
        self.extra_method = gr.Textbox("", label="More method options (YAML)", lines=2,
                                       placeholder="e.g. rank_pattern: {query: 4}", elem_id="method-extra")
        with gr.Group():
            with gr.Row():
                self.ds_source = gr.Radio(["bundled", "upload"], value="bundled", label="Dataset", elem_id="ds-source")
                self.ds_name = gr.Dropdown(list(BUNDLED_DATASETS), value=DEFAULT_DATASET, label="Bundled dataset",
                                           elem_id="ds-name")
                self.max_rows = gr.Number(0, label="max rows (0 = all)", precision=0, elem_id="max-rows")
            self.upload = gr.File(label="Upload CSV / JSONL / Parquet", file_types=[".csv", ".jsonl", ".parquet"],
                                  visible=False, elem_id="upload")
            self.upload_path = gr.Textbox(visible=False, elem_id="upload-path")
            with gr.Row(visible=False) as self.colmap:
                col_kw = dict(choices=[], allow_custom_value=True, elem_classes=["colmap"])
                self.text_col = gr.Dropdown(label="text column", elem_id="text-col", **col_kw)
                self.label_col = gr.Dropdown(label="label column", elem_id="label-col", **col_kw)
                self.prompt_col = gr.Dropdown(label="prompt column", elem_id="prompt-col", **col_kw)
                self.response_col = gr.Dropdown(label="response column", elem_id="response-col", **col_kw)
            self.preview = gr.Dataframe(label="First rows", interactive=False, elem_id="preview", max_height=220,
                                        wrap=True)
            with gr.Accordion("Several datasets (multi-task run)", open=False, elem_id="multitask"):
                gr.Markdown("Add the dataset above as a task, pick or upload another, add it too: the run then "
                            "trains on all listed tasks (one head per classification task; a batch is drawn from "
                            "one task, task *i* with probability ∝ rows^(1/T)) and reports metrics per task.")
                with gr.Row():
                    self.task_name = gr.Textbox(label="task name", placeholder="from the dataset", elem_id="task-name")
                    self.add_task_btn = gr.Button("Add this dataset as a task", elem_id="add-task")
                    self.temperature = gr.Number(10.0, label="temperature T", elem_id="temperature")
                self.tasks_yaml = gr.Code("", language="yaml", label="Tasks (empty: one dataset)", interactive=True,
                                          elem_id="tasks-yaml")
        with gr.Row():
            self.max_steps = gr.Number(DEFAULT_STEPS, label="max steps", precision=0, elem_id="max-steps")
            self.batch = gr.Number(8, label="batch size", precision=0, elem_id="batch")
            self.lr = gr.Number(default_lr(DEFAULT_METHOD), label="learning rate", elem_id="lr",
                                info="the method's measured default (bench/RESULTS-default-lr.md)")
            self.seq = gr.Number(64, label="max seq len", precision=0, elem_id="seq")
            self.eval_every = gr.Number(10, label="eval every", precision=0, elem_id="eval-every",
                                        info=EVAL_BOUND_TEXT)
            self.seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
            self.devices = gr.Number(1, label="devices", precision=0, elem_id="devices",
                                     info="one process per GPU")
            self.strategy = gr.Radio(STRATEGIES, value="ddp", label="strategy", elem_id="strategy",
                                     info="fsdp shards the model")
            self.optimizer = gr.Dropdown(OPTIMIZERS, value=DEFAULT_OPTIMIZER, label="optimizer", elem_id="optimizer",
                                         info="8-bit: block-wise quantized AdamW states; paged: kept in host memory")
            task0 = default_task(DEFAULT_MODEL) or "classification"
            self.metric = gr.Dropdown(metric_choices(task0), value=default_metric(task0), label="metric",
                                      elem_id="metric", info="what ranks the run (its best metric)")
            self.eval_generate = gr.Number(DEFAULT_EVAL_GENERATE, label="generate on N eval prompts", precision=0,
                                           visible=task0 == "causal_lm", elem_id="eval-generate",
                                           info=f"BLEU / ROUGE-L / exact match at each evaluation, at most "
                                                f"{DEFAULT_GEN_TOKENS} new tokens each (0: off)")
        with gr.Accordion("Tracking", open=False, elem_id="tracking"):
            gr.Markdown("Mirror the run to your experiment tracker: params, metrics per step, the memory estimate "
                        "and the measured peak, the adapter and the status. Credentials stay in the worker's "
                        "environment (MLFLOW_TRACKING_USERNAME / _PASSWORD, WANDB_API_KEY), never in the config.")
            with gr.Row():
                self.mlflow_uri = gr.Textbox(label="MLflow tracking URI", placeholder="http://mlflow.example:5000",
                                             elem_id="mlflow-uri", scale=3)
                self.tensorboard = gr.Checkbox(False, label="TensorBoard event files", elem_id="tensorboard")
            with gr.Row():
                self.wandb_project = gr.Textbox(label="W&B project", placeholder="off", elem_id="wandb-project")
                self.wandb_entity = gr.Textbox(label="W&B entity", placeholder="your default", elem_id="wandb-entity")
                self.wandb_mode = gr.Radio(WANDB_MODES, value="online", label="W&B mode", elem_id="wandb-mode")
        with gr.Row():
            self.preview_btn = gr.Button("Preview config", elem_id="preview-config")
            self.launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
        with gr.Row():
            self.sweep_text = gr.Textbox(label="Sweep", placeholder="r: 4, 8, 16  ·  method: lora, dora  ·  "
                                         "learning_rate: 1e-4, 5e-4", elem_id="sweep", scale=3)
            self.sweep_btn = gr.Button("Launch sweep", elem_id="launch-sweep", scale=1)
        self.msg = gr.Markdown("", elem_id="launch-msg")
        self.config_yaml = gr.Code(language="yaml", label="Config (what `peft-studio train` would run)",
                                   visible=False, elem_id="config-yaml")
        # the form by key: FORM_KEYS, then the method fields
        self.form = {key: getattr(self, key) for key in FORM_KEYS} | self.fields

    def _estimate_column(self) -> None:
        with gr.Row():
            self.formula = gr.Radio(["model", "appendix", "slide"], value="model", label="Formula", elem_id="formula")
            self.dtype = gr.Radio(["fp32", "bf16", "fp16"], value="fp32", label="Precision", elem_id="dtype")
        with gr.Row():
            self.gpu = gr.Dropdown(gpu_choices([]), value=str(int(DEFAULT_GPU)), label="Device", elem_id="gpu",
                                   info="what the estimate is for; a CPU-only studio starts on the CPU")
            self.quant = gr.Radio(["none", "nf4", "nf4-dq"], value="none", label="Base weights", elem_id="quant")
        self.est_plot = gr.Plot(label="Memory estimate", elem_id="estimate-plot")
        self.est_md = gr.Markdown(elem_id="estimate-text")

    # -------------------------------------------------------------- helpers for events

    def values(self, data: dict) -> dict[str, Any]:
        """{form key: value} from the {component: value} dict a handler with set inputs receives."""
        return {key: data[c] for key, c in self.form.items() if c in data}

    def method_updates(self, mname: str, model: str, values: dict | None = None) -> dict:
        """Show the controls of method `mname` (with `values`, else its defaults); hide the rest."""
        fs = method_fields(mname)
        out: dict = {self.method_md: method_help(mname)}
        for fname, comp in self.fields.items():
            if fname not in fs:
                out[comp] = gr.update(visible=False)
                continue
            val = (values or {}).get(fname, field_default(mname, fname, model))
            kw: dict[str, Any] = {"visible": True, "value": val}
            if METHOD_FIELDS[fname] == "choice":
                kw["choices"] = field_choices(mname, fname)
            out[comp] = gr.update(**kw)
        return out

    def fill_from(self, cfg: dict) -> dict:
        """Updates that put run config `cfg` into the form ('clone into Launch')."""
        form = form_from_config(cfg)
        out = {self.form[key]: gr.update(value=form.get(key)) for key in FORM_KEYS}
        out |= self.task_updates(form.get("task") or "classification", form.get("metric"))
        out[self.eval_generate] = gr.update(value=form.get("eval_generate"),
                                            visible=form.get("task") == "causal_lm")
        return out | self.method_updates(form["method"], form["model"], form)

    def task_updates(self, task: str, metric=None) -> dict:
        """The metric dropdown follows the task (keeping a metric the task has), and the
        generation count shows for causal LM only."""
        choices = metric_choices(task)
        keep = metric if metric in choices else default_metric(task)
        return {self.metric: gr.update(choices=choices, value=keep),
                self.eval_generate: gr.update(visible=task == "causal_lm")}

    # -------------------------------------------------------------- events

    def wire(self, demo: gr.Blocks, run_id: gr.Number) -> None:
        ctx, form_inputs = self.ctx, set(self.form.values())
        targets = self.fields["target_modules"]

        def on_model(m, mname):
            task = default_task(m)
            out: dict = {}
            if task:
                out[self.task] = task
                out[self.ds_name] = default_dataset(task)
            if "target_modules" in method_fields(mname):
                out[targets] = field_default(mname, "target_modules", m)
            return out or gr.skip()
        self.model.input(on_model, [self.model, self.method], [self.task, self.ds_name, targets])

        def on_method(mname, m):
            # what belonged to the previous method goes: its learning rate, its base quantization, its YAML options
            spec = METHODS.get(mname)
            return self.method_updates(mname, m) | {
                self.lr: default_lr(mname), self.extra_method: "",
                self.quant: "nf4" if spec is not None and spec.quantizes_base else "none"}
        self.method.input(on_method, [self.method, self.model],
                          [self.method_md, self.lr, self.extra_method, self.quant] + list(self.fields.values()))

        self.task.change(self.task_updates, [self.task, self.metric], [self.metric, self.eval_generate])

        def on_source(src):
            up = src == "upload"
            return {self.ds_name: gr.update(visible=not up), self.upload: gr.update(visible=up),
                    self.colmap: gr.update(visible=up)}
        self.ds_source.change(on_source, self.ds_source, [self.ds_name, self.upload, self.colmap])

        col_guesses = {self.text_col: ("text", "sentence", "content"),
                       self.label_col: ("label", "labels", "target", "class"),
                       self.prompt_col: ("prompt", "instruction", "question", "input"),
                       self.response_col: ("response", "output", "answer", "completion")}

        def on_upload(f, request: gr.Request):
            if f is None:
                return {self.upload_path: "", self.preview: None, self.msg: ""}
            path = f if isinstance(f, str) else getattr(f, "name", None)
            try:
                info = service.save_upload(ctx.settings, os.path.basename(path), path, owner=ctx.user(request))
            except service.SubmitError as e:
                return {self.upload_path: "", self.preview: None, self.msg: f"✗ {e}"}
            cols = info["columns"]
            out = {self.upload_path: info["path"], self.preview: preview_frame(info["preview"]),
                   self.msg: f"Uploaded **{info['name']}**: {info['rows']} rows; columns: {', '.join(cols)}"}
            for comp, names in col_guesses.items():
                out[comp] = gr.update(choices=cols, value=next((c for c in cols if c.lower() in names), None))
            return out
        self.upload.upload(on_upload, self.upload, [self.upload_path, self.preview, self.msg, *col_guesses])

        self.ds_name.change(bundled_preview, self.ds_name, self.preview)

        def on_add_task(data):
            try:
                return {self.tasks_yaml: add_task_entry(data[self.tasks_yaml], self.values(data), data[self.task_name]),
                        self.task_name: "", self.msg: ""}
            except service.SubmitError as e:
                return {self.msg: f"✗ {e}"}
        self.add_task_btn.click(on_add_task, form_inputs | {self.task_name}, [self.tasks_yaml, self.task_name, self.msg])

        def on_preview(data):
            try:
                cfg = service.validate_config(build_config(self.values(data)), ctx.settings)
            except (service.SubmitError, ValueError) as e:
                return {self.config_yaml: gr.update(visible=False), self.msg: f"✗ {e}"}
            return {self.config_yaml: gr.update(value=cfg.to_yaml(), visible=True), self.msg: "Config is valid."}
        self.preview_btn.click(on_preview, form_inputs, [self.config_yaml, self.msg])

        def on_launch(data, request: gr.Request = None):
            try:
                rid = service.submit_run(ctx.settings, build_config(self.values(data)), owner=ctx.user(request))
            except (service.SubmitError, ValueError) as e:
                return {self.msg: f"✗ {e}"}
            return {self.msg: f"✓ Run **{rid}** queued — follow it in the Runs tab.", run_id: rid}
        self.launch_btn.click(on_launch, form_inputs, [self.msg, run_id])

        def on_sweep(data, request: gr.Request = None):
            try:
                cfgs = sweep_configs(self.values(data), data[self.sweep_text])
                for c in cfgs:   # validate all before queuing any
                    service.validate_config(c, ctx.settings)
            except (service.SubmitError, ValueError) as e:
                return f"✗ {e}"
            ids = [service.submit_run(ctx.settings, c, owner=ctx.user(request)) for c in cfgs]
            return f"✓ Sweep queued {len(ids)} runs: " + ", ".join(f"**{i}**" for i in ids)
        self.sweep_btn.click(on_sweep, form_inputs | {self.sweep_text}, self.msg)

        est_inputs = {self.model, self.task, self.method, self.extra_method, self.batch, self.seq, self.formula,
                      self.gpu, self.dtype, self.quant, self.devices, self.strategy, self.optimizer,
                      *self.fields.values()}

        def on_estimate(data):
            g = data[self.gpu]
            fig, text = estimate_view(data[self.model], data[self.task], data[self.method],
                                      {k: data[c] for k, c in self.fields.items()}, data[self.extra_method],
                                      data[self.batch], data[self.seq], data[self.formula], g, data[self.dtype],
                                      data[self.quant], gpu_name=gpu_label(g, ctx.workers()) if g else "",
                                      world_size=data[self.devices], strategy=data[self.strategy],
                                      optimizer=data[self.optimizer])
            return {self.est_plot: fig, self.est_md: text}
        est_outs = [self.est_plot, self.est_md]
        gr.on([c.change for c in est_inputs], on_estimate, est_inputs, est_outs, show_progress="hidden",
              trigger_mode="always_last")

        def on_load(ds):
            workers = ctx.workers()
            return {self.gpu: gr.update(choices=gpu_choices(workers), value=default_device(workers)),
                    self.preview: bundled_preview(ds)}
        demo.load(on_load, self.ds_name, [self.gpu, self.preview]).then(on_estimate, est_inputs, est_outs)
