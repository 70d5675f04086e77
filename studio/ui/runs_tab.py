"""The Runs tab: the live runs table, the selected run's progress, curves
(training loss smoothed as in TensorBoard; validation; generation metrics with
a table of the decoded samples), where the run is tracked, config and log
(tracker warnings among its lines), and its actions (cancel, resume, priority,
clone, delete, download, merged model, GGUF). Everything shown is read from
the database."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

import gradio as gr
import yaml

from engine.methods import METHODS
from workers.settings import Settings

from .. import charts, compare, service
from .common import GIB, Ctx, error_text, link_download

RUN_COLUMNS = ["id", "name", "model", "method", "rank", "status", "trainable %", "best metric",
               "est. peak GiB", "measured peak GiB", "tokens/s", "duration s", "owner"]
GGUF_QUANTS = ["f16", "q8_0"]
STATUS_FILTERS = ["all", "queued", "running", "succeeded", "failed", "cancelled"]
PRIORITY_RANGE = (-5, 5)
log = logging.getLogger("peft_studio.ui")


# ------------------------------------------------------------------ pure views of runs

def trainable_pct(r: dict) -> Optional[float]:
    return (100 * r["n_trainable"] / r["n_params"]) if r.get("n_params") and r.get("n_trainable") else None


def run_row(r: dict) -> list:
    tr = trainable_pct(r)
    return [r["id"], r["name"], r["model"], r["method"], r["rank"], r["status"],
            None if tr is None else round(tr, 4),
            None if r["best_metric"] is None else round(r["best_metric"], 4),
            None if not compare.estimate_of(r)[0] else round(compare.estimate_of(r)[0] / GIB, 3),
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


def fmt_eta(s: Optional[float]) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def resumed_text(run: dict) -> str:
    """'resumed from step N (attempt k)' when the current attempt started from a checkpoint, else ''."""
    step = run.get("resumed_from_step")
    if step is None:
        return ""
    return f"resumed from step **{int(step)}**" + (f" (attempt {run['attempts']})" if run.get("attempts") else "")


def distributed_of_run(run: dict) -> tuple[str, int]:
    """(strategy, world size) of a run's config (ddp, 1 when it has none)."""
    d = ((run.get("config") or {}).get("training") or {}).get("distributed") or {}
    return d.get("strategy") or "ddp", int(d.get("world_size") or 1)


def placement_text(run: dict) -> str:
    """Where a run runs: the worker and device, plus world size, strategy and each
    rank's host/device when the run spans more than one process."""
    strategy, world = distributed_of_run(run)
    where = f"worker: {run.get('worker_host') or '–'} · device: {run.get('device') or '–'}"
    if world <= 1:
        return where
    ranks = run.get("ranks") or []
    per_rank = "; ".join(f"rank {r.get('rank', i)}: {r.get('host') or '–'} {r.get('device') or ''}".rstrip()
                         for i, r in enumerate(ranks) if isinstance(r, dict))
    return f"{where} · **{world} ranks** ({strategy})" + (f"  \n{per_rank}" if per_rank else "")


def run_status_md(run: dict, metrics: list[dict]) -> str:
    last = metrics[-1] if metrics else {}
    evals = [m for m in metrics if m.get("eval")]
    last_eval = evals[-1]["eval"] if evals else {}
    ev = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in last_eval.items()   # tasks: eval/<task>/...
                   if charts.is_number(v) and not k.endswith(("eval_rows", "gen_rows")))
    if ev and last_eval.get("eval_rows"):
        ev = f"{ev} (on {int(last_eval['eval_rows']):,} rows)"
    if ev and charts.is_number(last_eval.get("gen_rows")):
        ev = f"{ev}; generation scored on {int(last_eval['gen_rows']):,} prompts"
    loss = last.get("loss")
    lines = [f"### Run {run['id']} · {run['name']} — `{run['status']}`",
             f"step **{run['steps_done']}** / {run['max_steps'] or '?'}"
             + (f" · loss **{loss:.4f}**" if loss is not None else ""),
             (f"tokens/s **{last.get('tokens_per_s') or 0:.1f}**"
              + (f" · ETA **{fmt_eta(last.get('eta_s'))}**" if run["status"] == "running" else "")) if last else "",
             f"validation: {ev}" if ev else "",
             f"_{run['phase']}_" if run.get("phase") and run["status"] == "running" else "",
             resumed_text(run),
             f"{placement_text(run)} · launched by: {run.get('owner') or '–'}",
             f"trainable: {run['n_trainable']:,} of {run['n_params']:,} parameters" if run.get("n_params") else "",
             tracking_text(run)]
    if run.get("error") and run["status"] in ("failed", "cancelled"):
        lines.append(f"**{'Error' if run['status'] == 'failed' else 'Note'}:** {run['error']}")
    return "  \n".join(x for x in lines if x)


def without_credentials(uri: Optional[str]) -> str:
    """A URI as shown to people: any user:password@ part dropped."""
    if not uri:
        return "?"
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "?"
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def tracking_text(run: dict) -> str:
    """'tracked in: MLflow run … at …; TensorBoard logdir …; W&B run …' from `run['tracking']`, or ''."""
    t = run.get("tracking") or {}
    parts = []
    if m := t.get("mlflow"):
        parts.append(f"MLflow run `{m.get('run_id') or '?'}` (experiment {m.get('experiment_id') or '?'}) "
                     f"at {without_credentials(m.get('uri'))}")
    if tb := t.get("tensorboard"):
        parts.append(f"TensorBoard logdir `{tb.get('logdir') or '?'}`")
    if w := t.get("wandb"):
        parts.append(f"W&B run `{w.get('run_id') or '?'}` in project {w.get('project') or '?'} "
                     f"({w.get('mode') or '?'}" + (f", `{w['dir']}`" if w.get("dir") else "") + ")")
    return ("tracked in: " + "; ".join(parts)) if parts else ""


def _when(text) -> Optional[float]:
    """An ISO time (naive = UTC) as epoch seconds, or None."""
    try:
        t = dt.datetime.fromisoformat(str(text))
    except (TypeError, ValueError):
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def run_log(run: dict, metrics: list[dict]) -> str:
    """A plain-text log of the run from what the database holds, the run's warnings (a tracker
    that was down, ...) placed among the step lines by time (a step's time: start + elapsed)."""
    queued = f"{run['created_at']}  run {run['id']} queued by {run.get('owner') or 'anonymous'}"
    events: list[tuple[Optional[float], str]] = [(_when(run.get("created_at")), queued)]
    start = _when(run.get("started_at"))
    if run.get("started_at"):
        events.append((start, f"{run['started_at']}  run {run['id']} started on {run.get('worker_host')} "
                              f"({run.get('device')})"))
    for m in metrics:
        ev = " ".join(f"{k}={v:.4f}" for k, v in (m.get("eval") or {}).items() if charts.is_number(v))
        loss = "–" if m.get("loss") is None else f"{m['loss']:.4f}"
        lr = "–" if m.get("lr") is None else f"{m['lr']:.2e}"
        at = start + m["elapsed_s"] if start is not None and charts.is_number(m.get("elapsed_s")) else None
        events.append((at, f"step {m['step']:>6}  loss {loss}  lr {lr}  tokens/s {m.get('tokens_per_s') or 0:.1f}"
                           + (f"  eval {ev}" if ev else "")))
    if run.get("finished_at"):
        events.append((_when(run.get("finished_at")), f"{run['finished_at']}  run {run['id']} {run['status']}"
                       + (f": {run['error']}" if run.get("error") else "")))
    lines = events
    for w in run.get("warnings") or []:
        if isinstance(w, dict) and w.get("message"):
            t = _when(w.get("at"))
            line = (t, f"{w.get('at') or '?'}  run {run['id']} warning: {w['message']}")
            # after the last line at or before its time (lines without a time keep their place)
            pos = len(lines)
            if t is not None:
                for i in range(len(lines) - 1, -1, -1):
                    if lines[i][0] is not None and lines[i][0] > t:
                        pos = i
                    elif lines[i][0] is not None:
                        break
            lines.insert(pos, line)
    return "\n".join(text for _, text in lines[-400:])


def run_signature(run: Optional[dict]) -> Optional[tuple]:
    return None if run is None else (run["id"], run["status"], run["steps_done"], run.get("finished_at"),
                                     len(run.get("warnings") or []), repr(run.get("tracking")), run.get("phase"))


def adapter_download(settings: Settings, run_id: int) -> Optional[str]:
    """A path the browser can download run `run_id`'s adapter zip from (the store's
    verified local copy, linked under its download name), or None when it has none
    or the stored bytes are refused."""
    from workers.store import StoreError

    try:
        src, name = service.adapter_file(settings, run_id)
    except service.NotFound:
        return None
    except StoreError as e:
        log.warning("run %s: adapter not offered for download: %s", run_id, e)
        return None
    return link_download(src, name)


def workers_md(workers: list[dict]) -> str:
    """The workers panel: per worker its device, memory, how many runs it may hold at once,
    the runs it is running and (a packing worker) the memory reserved for them."""
    if not workers:
        return "**Workers:** none connected yet."

    def reserved(w: dict) -> str:
        if w.get("reserved_memory") is None:
            return "–"
        return f"{w['reserved_memory'] / GIB:.2f} / {(w['total_memory'] or 0) / GIB:.2f} GiB"

    def running(w: dict) -> str:
        ids = w.get("running") or []
        return ", ".join(f"#{i}" for i in ids) if ids else "–"

    rows = "\n".join(f"| {w['name']} | {w['device']} | {(w['total_memory'] or 0) / GIB:.1f} GiB | "
                     f"{(w['free_memory'] or 0) / GIB:.1f} GiB | {w.get('concurrency') or 1} | {running(w)} | "
                     f"{reserved(w)} | {w['heartbeat_at']} |" for w in workers)
    return ("**Connected workers**\n\n| worker | device | memory | free | runs at once | running | "
            "reserved / total | last heartbeat (UTC) |\n|---|---|---|---|---|---|---|---|\n" + rows)


# ------------------------------------------------------------------ the tab

class RunsTab:
    """The Runs tab's components (built inside the current gr.Tab) and its events."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        with gr.Row():
            self.query = gr.Textbox(label="Filter", placeholder="words in any column", elem_id="runs-filter", scale=3)
            self.status = gr.Dropdown(STATUS_FILTERS, value="all", label="Status", elem_id="runs-status", scale=1)
            self.sort_by = gr.Dropdown(RUN_COLUMNS, value="id", label="Sort by", elem_id="runs-sort", scale=1)
            self.desc = gr.Checkbox(True, label="descending", elem_id="runs-desc", scale=1)
        self.table = gr.Dataframe(headers=RUN_COLUMNS, value=None, interactive=False,
                                  label="Runs (live; click a row)", elem_id="runs-table", max_height=320, wrap=False)
        with gr.Row(elem_classes=["runs-actions"]):
            self.run_id = gr.Number(label="Selected run id", precision=0, elem_id="run-id", scale=1)
            self.cancel_btn = gr.Button("Cancel", elem_id="cancel", variant="stop")
            self.resume_btn = gr.Button("Resume", elem_id="resume")
            self.up_btn = gr.Button("Priority ↑", elem_id="priority-up")
            self.down_btn = gr.Button("Priority ↓", elem_id="priority-down")
            self.clone_btn = gr.Button("Clone into Launch", elem_id="clone")
            self.delete_btn = gr.Button("Delete", elem_id="delete")
            self.dl_btn = gr.DownloadButton("Download adapter", value=None, interactive=False,
                                            elem_id="download-adapter")
            self.merged_btn = gr.Button("Build merged model", elem_id="build-merged", interactive=False)
            self.gguf_quant = gr.Dropdown(GGUF_QUANTS, value="f16", label="GGUF type", elem_id="gguf-quant",
                                          scale=1, min_width=90)
            self.gguf_btn = gr.Button("Export GGUF", elem_id="export-gguf", interactive=False)
        self.merged_file = gr.File(label="Merged model zip", interactive=False, visible=False, elem_id="merged-file")
        self.gguf_msg = gr.Markdown(elem_id="gguf-msg")
        self.gguf_file = gr.File(label="GGUF file", interactive=False, visible=False, elem_id="gguf-file")
        self.status_md = gr.Markdown(elem_id="run-status")
        self.smoothing = gr.Slider(0, charts.SMOOTHING_MAX, value=charts.SMOOTHING_DEFAULT, step=0.01,
                                   label="Loss smoothing (EMA weight; 0 = raw)", elem_id="runs-smoothing")
        with gr.Row():
            self.loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
            self.eval_plot = gr.Plot(label="Validation", elem_id="eval-plot")
        with gr.Group(visible=False) as self.gen_group:      # causal-LM runs with generation metrics
            self.gen_plot = gr.Plot(label="Generation metrics", elem_id="gen-plot")
            self.sample_step = gr.Dropdown([], label="Samples of the evaluation at", elem_id="sample-step")
            self.samples = gr.Dataframe(headers=compare.SAMPLE_COLUMNS, interactive=False, wrap=True,
                                        label="Decoded samples (prompt, reference, output)", elem_id="gen-samples")
        with gr.Row():
            self.config = gr.Code(language="yaml", label="Config", elem_id="run-config")
            self.log = gr.Textbox(label="Log", lines=14, max_lines=14, interactive=False, elem_id="run-log",
                                  autoscroll=True)
        self.table_sig = gr.State(None)
        self.run_sig = gr.State(None)
        self.workers = gr.Markdown(elem_id="workers")

    # -------------------------------------------------------------- what a refresh sends

    def generation(self, metrics: list[dict], label: str, step=None) -> dict:
        """The generation view: curves, the eval steps with samples, and the samples of `step`
        (the latest by default); hidden for a run without generation metrics."""
        import pandas as pd

        if not compare.has_generation_metrics(metrics) and not compare.sample_steps(metrics):
            return {self.gen_group: gr.update(visible=False), self.gen_plot: None,
                    self.sample_step: gr.update(choices=[], value=None), self.samples: None}
        chosen, rows = compare.samples_table(metrics, step)
        return {self.gen_group: gr.update(visible=True), self.gen_plot: charts.generation_curves({label: metrics}),
                self.sample_step: gr.update(choices=[(f"step {s}", s) for s in compare.sample_steps(metrics)],
                                            value=chosen),
                self.samples: pd.DataFrame(rows, columns=compare.SAMPLE_COLUMNS)}

    def details(self, rid, request, smoothing: float = 0.0) -> tuple[Optional[dict], dict]:
        """(run, {component: value} for the detail widgets) of run `rid`, or a message."""
        try:
            run = self.ctx.visible_run(rid, request)
        except service.NotFound as e:
            return None, {self.status_md: error_text(e), self.loss_plot: None, self.eval_plot: None,
                          self.config: "", self.log: "", **self.generation([], "")}
        metrics = service.get_metrics(self.ctx.settings, run["id"])
        label = f"run {run['id']}"
        metric_name = run.get("metric_name") or ("accuracy" if run["task"] == "classification" else "eval_loss")
        return run, {self.status_md: run_status_md(run, metrics),
                     self.loss_plot: charts.loss_curves({label: metrics}, smoothing=smoothing or 0.0),
                     self.eval_plot: charts.eval_curves({label: metrics}, metric_name),
                     self.config: yaml.safe_dump(run["config"], sort_keys=False), self.log: run_log(run, metrics),
                     **self.generation(metrics, label)}

    def actions(self, run: Optional[dict]) -> dict:
        """The download button (with the adapter zip), the merged-model button and the resume
        button (only where a resume can succeed: service.not_resumable) for `run`."""
        path = None
        if run and run.get("adapter"):
            path = adapter_download(self.ctx.settings, run["id"])
        spec = METHODS.get(run["method"]) if run else None
        gguf = bool(run and run["status"] == "succeeded" and run.get("task") == "causal_lm")
        return {self.dl_btn: gr.update(value=path, interactive=path is not None),
                self.merged_btn: gr.update(interactive=bool(run and run.get("adapter") and spec and spec.mergeable)),
                self.gguf_btn: gr.update(interactive=gguf),
                self.resume_btn: gr.update(interactive=bool(run) and service.not_resumable(run) is None)}

    def rows(self, request, q, st, sb, desc) -> list[list]:
        return filter_sort(runs_table(self.ctx.settings, owner=self.ctx.visible_owner(request)), q, st, sb, desc)

    # -------------------------------------------------------------- events

    def wire(self, demo: gr.Blocks, timer: gr.Timer, selected_store: gr.BrowserState) -> None:
        ctx = self.ctx
        view_inputs = [self.run_id, self.query, self.status, self.sort_by, self.desc, self.smoothing]
        detail_outs = [self.status_md, self.loss_plot, self.eval_plot, self.config, self.log, self.gen_group,
                       self.gen_plot, self.sample_step, self.samples]
        run_outs = [self.table, self.table_sig, self.run_sig, *detail_outs, self.dl_btn, self.merged_btn,
                    self.gguf_btn, self.resume_btn, self.merged_file, self.gguf_file, self.gguf_msg]

        def show_run(rid, q, st, sb, desc, smoothing, request: gr.Request = None):
            """Full refresh: the table, the selected run's details and actions."""
            rows = self.rows(request, q, st, sb, desc)
            run, dets = self.details(rid, request, smoothing)
            return {self.table: rows, self.table_sig: repr(rows), self.run_sig: run_signature(run), **dets,
                    **self.actions(run), self.merged_file: gr.update(visible=False),
                    self.gguf_file: gr.update(value=None, visible=False), self.gguf_msg: ""}
        self.run_id.change(show_run, view_inputs, run_outs).then(lambda r: r, self.run_id, selected_store)
        for c in (self.query, self.status, self.sort_by, self.desc):
            c.change(show_run, view_inputs, run_outs, show_progress="hidden")

        def on_tick(rid, q, st, sb, desc, smoothing, tsig, rsig, request: gr.Request = None):
            """Poll the database; send only what changed (keeps the table's scroll and selection)."""
            rows = self.rows(request, q, st, sb, desc)
            sig = repr(rows)
            out: dict = {self.table_sig: sig}
            if sig != tsig:
                out[self.table] = rows
            try:
                current = ctx.visible_run(rid, request)
            except service.NotFound:
                current = None
            if run_signature(current) == rsig:     # the details shown are still true
                return out
            run, dets = self.details(rid, request, smoothing)
            return out | {self.run_sig: run_signature(run), **dets, **self.actions(run)}
        timer.tick(on_tick, view_inputs + [self.table_sig, self.run_sig], run_outs, show_progress="hidden")

        def on_select(evt: gr.SelectData):
            try:
                return int((evt.row_value or [])[0])
            except (TypeError, ValueError, IndexError):
                return gr.skip()
        self.table.select(on_select, None, self.run_id)

        demo.load(lambda saved: saved if saved else gr.skip(), selected_store, self.run_id)
        demo.load(show_run, view_inputs, run_outs)

        def on_smoothing(rid, smoothing, request: gr.Request = None):
            """Only the loss chart changes with the smoothing weight."""
            try:
                run = ctx.visible_run(rid, request)
            except service.NotFound:
                return gr.skip()
            return charts.loss_curves({f"run {run['id']}": service.get_metrics(ctx.settings, run["id"])},
                                      smoothing=smoothing or 0.0)
        self.smoothing.change(on_smoothing, [self.run_id, self.smoothing], self.loss_plot,
                              trigger_mode="always_last", show_progress="hidden")

        def on_sample_step(rid, step, request: gr.Request = None):
            try:
                run = ctx.visible_run(rid, request)
            except service.NotFound:
                return gr.skip()
            out = self.generation(service.get_metrics(ctx.settings, run["id"]), f"run {run['id']}", step)
            return out[self.samples]
        self.sample_step.input(on_sample_step, [self.run_id, self.sample_step], self.samples)

        def act(action):
            def handler(rid, request: gr.Request = None):
                """Cancel / resume / reprioritize the selected run; the service's error is the message."""
                try:
                    run = ctx.visible_run(rid, request)
                    return action(run)
                except (service.NotFound, service.SubmitError) as e:
                    return error_text(e)
            return handler

        def cancel(run):
            st = service.cancel_run(ctx.settings, run["id"])
            return f"Run {run['id']}: {st if st != 'running' else 'stopping at the next step'}"

        def resume(run):
            r = service.resume_run(ctx.settings, run["id"])
            return f"Run {run['id']} queued again; it continues from step {r['from_step']}."

        def bump(delta):
            def set_priority(run):
                lo, hi = PRIORITY_RANGE
                prio = max(lo, min(hi, int(run.get("priority") or 0) + delta))
                service.set_priority(ctx.settings, run["id"], prio)
                return f"Run {run['id']}: priority {prio} (higher runs first)."
            return set_priority

        for btn, action in ((self.cancel_btn, cancel), (self.resume_btn, resume), (self.up_btn, bump(1)),
                            (self.down_btn, bump(-1))):
            btn.click(act(action), self.run_id, self.status_md)

        def show_workers():
            return workers_md(ctx.workers())
        demo.load(show_workers, None, self.workers)
        gr.Timer(10.0).tick(show_workers, None, self.workers, show_progress="hidden")

        def on_delete(rid, request: gr.Request = None):
            try:
                run = ctx.visible_run(rid, request)
                service.delete_run(ctx.settings, run["id"])
            except (service.NotFound, service.SubmitError) as e:
                return {self.status_md: error_text(e)}
            return {self.status_md: f"Run {run['id']} deleted.", self.run_id: None}
        self.delete_btn.click(on_delete, self.run_id, [self.status_md, self.run_id])

        def on_merged(rid, request: gr.Request = None):
            from ..artifacts import ArtifactError, merged_zip_path
            try:
                run = ctx.visible_run(rid, request)
                path, name = merged_zip_path(ctx.settings, run["id"])
            except (service.NotFound, ArtifactError, ValueError) as e:
                raise gr.Error(str(e))
            return gr.update(value=link_download(path, name), visible=True)
        self.merged_btn.click(on_merged, self.run_id, self.merged_file)

        def on_gguf(rid, quant, request: gr.Request = None):
            """The merged model as GGUF (studio.gguf): a download, or the reason there is none."""
            from ..artifacts import ArtifactError
            try:
                run = ctx.visible_run(rid, request)
                from ..gguf import gguf_file        # imported here: the GGUF writer loads only when asked
                path, name = gguf_file(ctx.settings, run["id"], quant or "f16")
            except (service.NotFound, ArtifactError, ValueError) as e:
                return {self.gguf_msg: error_text(e), self.gguf_file: gr.update(value=None, visible=False)}
            return {self.gguf_msg: f"GGUF ({quant}) of run {run['id']}: **{name}**",
                    self.gguf_file: gr.update(value=link_download(path, name), visible=True)}
        self.gguf_btn.click(on_gguf, [self.run_id, self.gguf_quant], [self.gguf_msg, self.gguf_file])

    def wire_clone(self, launch, tabs: gr.Tabs) -> None:
        """'Clone into Launch': the selected run's config into the Launch form, and switch tabs."""
        ctx = self.ctx

        def on_clone(rid, request: gr.Request = None):
            try:
                run = ctx.visible_run(rid, request)
            except service.NotFound as e:
                return {self.status_md: error_text(e)}
            return launch.fill_from(run["config"]) | {
                tabs: gr.Tabs(selected="launch"), launch.msg: f"Cloned run {run['id']}: edit and launch.",
                self.status_md: ""}
        outs = [*launch.form.values(), launch.method_md, tabs, launch.msg, self.status_md]
        self.clone_btn.click(on_clone, self.run_id, outs)
