"""The Benchmarks tab: evaluate finished runs (and their base model) on lm-evaluation-harness
tasks as queued jobs, and read the table of runs x tasks — each task's main metric
"value ± stderr", the base model as the first row — with the jobs and their state below.
Everything shown is read from the database (studio.benchmarks)."""

from __future__ import annotations

from typing import Optional

import gradio as gr

from .. import benchmarks as bm
from .. import compare
from .common import Ctx, run_choices

JOB_COLUMNS = ["job", "evaluates", "tasks", "limit", "status", "note"]
HELP = ("Tasks: harness task names whose data the workers have offline (comma-separated), and/or a task of "
        "your own: harness YAML over a file uploaded in Launch (`dataset_kwargs: {data_files: upload:<name>}`, "
        "task name `user_...`). See docs/benchmarks.md.")


def job_rows(jobs: list[dict]) -> list[list]:
    out = []
    for j in jobs:
        target = f"run #{j['run_id']}" if j["run_id"] is not None else f"base {j['model']}"
        note = j.get("error") or j.get("phase") or ""
        out.append([j["id"], target, ", ".join(j["tasks"]), j["limit"] if j["limit"] is not None else "",
                    j["status"], note[:300]])
    return out


def parse_limit(v) -> Optional[float]:
    if v in (None, "", 0):
        return None
    return float(v)


class BenchmarksTab:
    """The Benchmarks tab's components (built inside the current gr.Tab) and its events."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        gr.Markdown(HELP)
        with gr.Row():
            self.runs = gr.Dropdown([], multiselect=True, label="Finished runs", elem_id="bench-runs", scale=4)
            self.refresh = gr.Button("Refresh", elem_id="bench-refresh", scale=1)
        with gr.Row():
            self.tasks = gr.Textbox(label="Harness tasks (comma-separated)", elem_id="bench-tasks", scale=3)
            self.limit = gr.Number(None, label="Limit (documents per task; empty = all)", elem_id="bench-limit",
                                   minimum=0, scale=1)
        self.user_task = gr.Code(label="A task of your own (harness YAML over an uploaded file; optional)",
                                 language="yaml", elem_id="bench-user-task")
        with gr.Row():
            self.evaluate = gr.Button("Evaluate selected runs", variant="primary", elem_id="bench-evaluate")
            self.evaluate_base = gr.Button("Evaluate their base model", elem_id="bench-evaluate-base")
        self.msg = gr.Markdown(elem_id="bench-msg")
        self.table = gr.Dataframe(interactive=False, label="Runs × tasks (main metric ± stderr)",
                                  elem_id="bench-table", wrap=True)
        self.jobs = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, label="Benchmark jobs",
                                 elem_id="bench-jobs", wrap=True)

    def view(self, ids: list[int], owner: Optional[str]) -> tuple:
        import pandas as pd

        settings = self.ctx.settings
        jobs = bm.list_jobs(settings, run_ids=ids, owner=owner) if ids else []
        t = bm.table(settings, ids, owner=owner) if ids else {"columns": ["run", "method"], "rows": []}
        table = pd.DataFrame(t["rows"], columns=t["columns"]) if t["rows"] else None
        return table, pd.DataFrame(job_rows(jobs), columns=JOB_COLUMNS) if jobs else None

    def wire(self, demo: gr.Blocks, timer: Optional[gr.Timer] = None) -> None:
        ctx = self.ctx

        def visible_ids(sel, request) -> list[int]:
            ids = compare.parse_run_ids(sel)
            if ctx.visible_owner(request) is not None:
                mine = {r["id"] for r in ctx.visible_runs(request)}
                ids = [i for i in ids if i in mine]
            return ids

        def choices(request: gr.Request = None):
            return gr.update(choices=run_choices(ctx.visible_runs(request)))

        def show(sel, request: gr.Request = None):
            return self.view(visible_ids(sel, request), ctx.visible_owner(request))

        def body(tasks, limit, yaml_text) -> dict:
            out = {"tasks": [t.strip() for t in (tasks or "").split(",") if t.strip()], "limit": parse_limit(limit)}
            if yaml_text and yaml_text.strip():
                out["user_tasks"] = [yaml_text]
            return out

        def submit(sel, tasks, limit, yaml_text, request: gr.Request = None):
            ids = visible_ids(sel, request)
            if not ids:
                return ("Select one or more finished runs first.", *self.view(ids, ctx.visible_owner(request)))
            queued, errors = [], []
            for rid in ids:
                try:
                    run = ctx.visible_run(rid, request)
                    queued.append(bm.submit_for_run(ctx.settings, run, body(tasks, limit, yaml_text),
                                                    owner=ctx.user(request))["id"])
                except (bm.BenchmarkRequestError, LookupError) as e:
                    errors.append(f"run {rid}: {e}")
            msg = (f"Queued benchmark job(s) {', '.join(map(str, queued))}." if queued else "") + \
                  "".join(f"  \n**Refused** — {e}" for e in errors)
            return (msg, *self.view(ids, ctx.visible_owner(request)))

        def submit_base(sel, tasks, limit, yaml_text, request: gr.Request = None):
            ids = visible_ids(sel, request)
            if not ids:
                return ("Select a run: its base model is evaluated.", *self.view(ids, ctx.visible_owner(request)))
            run = ctx.visible_run(ids[0], request)
            seed = ((run.get("config") or {}).get("training") or {}).get("seed")
            try:
                job = bm.submit_for_base(ctx.settings, {**body(tasks, limit, yaml_text), "model": run["model"],
                                                        "seed": seed}, owner=ctx.user(request))
                msg = f"Queued benchmark job {job['id']} (base {run['model']})."
            except bm.BenchmarkRequestError as e:
                msg = f"**Refused** — {e}"
            return (msg, *self.view(ids, ctx.visible_owner(request)))

        ins = [self.runs, self.tasks, self.limit, self.user_task]
        outs = [self.msg, self.table, self.jobs]
        self.evaluate.click(submit, ins, outs)
        self.evaluate_base.click(submit_base, ins, outs)
        self.refresh.click(choices, None, self.runs).then(show, [self.runs], [self.table, self.jobs])
        self.runs.change(show, [self.runs], [self.table, self.jobs])
        demo.load(choices, None, self.runs)
