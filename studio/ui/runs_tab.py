"""The Runs tab: the live runs table, the selected run's progress, curves,
config and log, and its actions (cancel, resume, priority, clone, delete,
download, merged model). Everything shown is read from the database."""

from __future__ import annotations

import logging
from typing import Optional

import gradio as gr
import yaml

from engine.methods import METHODS
from workers.settings import Settings

from .. import charts, service
from .common import GIB, Ctx, error_text, link_download

RUN_COLUMNS = ["id", "name", "model", "method", "rank", "status", "trainable %", "best metric",
               "est. peak GiB", "measured peak GiB", "tokens/s", "duration s", "owner"]
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
                   if isinstance(v, (int, float)) and not k.endswith("eval_rows"))
    if ev and last_eval.get("eval_rows"):
        ev = f"{ev} (on {int(last_eval['eval_rows']):,} rows)"
    loss = last.get("loss")
    lines = [f"### Run {run['id']} · {run['name']} — `{run['status']}`",
             f"step **{run['steps_done']}** / {run['max_steps'] or '?'}"
             + (f" · loss **{loss:.4f}**" if loss is not None else ""),
             f"tokens/s **{last.get('tokens_per_s') or 0:.1f}** · ETA **{fmt_eta(last.get('eta_s'))}**" if last else "",
             f"validation: {ev}" if ev else "",
             f"_{run['phase']}_" if run.get("phase") and run["status"] == "running" else "",
             resumed_text(run),
             f"{placement_text(run)} · launched by: {run.get('owner') or '–'}",
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
    if not workers:
        return "**Workers:** none connected yet."
    rows = "\n".join(f"| {w['name']} | {w['device']} | {(w['total_memory'] or 0) / GIB:.1f} GiB | "
                     f"{(w['free_memory'] or 0) / GIB:.1f} GiB | {w['heartbeat_at']} |" for w in workers)
    return ("**Connected workers**\n\n| worker | device | memory | free | last heartbeat (UTC) |\n"
            "|---|---|---|---|---|\n" + rows)


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
        self.merged_file = gr.File(label="Merged model zip", interactive=False, visible=False, elem_id="merged-file")
        self.status_md = gr.Markdown(elem_id="run-status")
        with gr.Row():
            self.loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
            self.eval_plot = gr.Plot(label="Validation", elem_id="eval-plot")
        with gr.Row():
            self.config = gr.Code(language="yaml", label="Config", elem_id="run-config")
            self.log = gr.Textbox(label="Log", lines=14, max_lines=14, interactive=False, elem_id="run-log",
                                  autoscroll=True)
        self.table_sig = gr.State(None)
        self.run_sig = gr.State(None)
        self.workers = gr.Markdown(elem_id="workers")

    # -------------------------------------------------------------- what a refresh sends

    def details(self, rid, request) -> tuple[Optional[dict], dict]:
        """(run, {component: value} for the detail widgets) of run `rid`, or a message."""
        try:
            run = self.ctx.visible_run(rid, request)
        except service.NotFound as e:
            return None, {self.status_md: error_text(e), self.loss_plot: None, self.eval_plot: None,
                          self.config: "", self.log: ""}
        metrics = service.get_metrics(self.ctx.settings, run["id"])
        label = f"run {run['id']}"
        metric_name = run.get("metric_name") or ("accuracy" if run["task"] == "classification" else "eval_loss")
        return run, {self.status_md: run_status_md(run, metrics),
                     self.loss_plot: charts.loss_curves({label: metrics}),
                     self.eval_plot: charts.eval_curves({label: metrics}, metric_name),
                     self.config: yaml.safe_dump(run["config"], sort_keys=False), self.log: run_log(run, metrics)}

    def actions(self, run: Optional[dict]) -> dict:
        """The download button (with the adapter zip) and the merged-model button for `run`."""
        path = None
        if run and run.get("adapter"):
            path = adapter_download(self.ctx.settings, run["id"])
        spec = METHODS.get(run["method"]) if run else None
        return {self.dl_btn: gr.update(value=path, interactive=path is not None),
                self.merged_btn: gr.update(interactive=bool(run and run.get("adapter") and spec and spec.mergeable))}

    def rows(self, request, q, st, sb, desc) -> list[list]:
        return filter_sort(runs_table(self.ctx.settings, owner=self.ctx.visible_owner(request)), q, st, sb, desc)

    # -------------------------------------------------------------- events

    def wire(self, demo: gr.Blocks, timer: gr.Timer, selected_store: gr.BrowserState) -> None:
        ctx = self.ctx
        view_inputs = [self.run_id, self.query, self.status, self.sort_by, self.desc]
        detail_outs = [self.status_md, self.loss_plot, self.eval_plot, self.config, self.log]
        run_outs = [self.table, self.table_sig, self.run_sig, *detail_outs, self.dl_btn, self.merged_btn,
                    self.merged_file]

        def show_run(rid, q, st, sb, desc, request: gr.Request = None):
            """Full refresh: the table, the selected run's details and actions."""
            rows = self.rows(request, q, st, sb, desc)
            run, dets = self.details(rid, request)
            return {self.table: rows, self.table_sig: repr(rows), self.run_sig: run_signature(run), **dets,
                    **self.actions(run), self.merged_file: gr.update(visible=False)}
        self.run_id.change(show_run, view_inputs, run_outs).then(lambda r: r, self.run_id, selected_store)
        for c in (self.query, self.status, self.sort_by, self.desc):
            c.change(show_run, view_inputs, run_outs, show_progress="hidden")

        def on_tick(rid, q, st, sb, desc, tsig, rsig, request: gr.Request = None):
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
            run, dets = self.details(rid, request)
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
