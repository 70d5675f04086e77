"""The Studies tab: create a study (model, dataset, methods, optional ranks, budget,
metric, opened hyperparameters), follow it (each method's best run, metric vs learning
rate, the pruning history, parameter importance, the Pareto frontiers of the best runs),
open Compare with one best run per method, cancel. Reads the database only
(studio.studies); the search runs in studio.study_driver."""

from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from engine.config import METRIC_DIRECTION
from engine.data import BUNDLED_DATASETS
from engine.methods import METHODS, get_method

from .. import service, studies, study_charts
from ..study_space import StudyError
from ..study_storage import StudyStorageError
from .common import Ctx
from .forms import DEFAULT_MODEL, MODEL_CHOICES



def default_methods() -> list[str]:
    """The form's first study: the first registered method of each family that trains new or
    selected parameters of a full-precision base (LoRA, IA3, BitFit, prompt tuning today)."""
    from engine.methods.base import Family

    out = []
    for fam in (Family.LORA, Family.IA3, Family.SELECTIVE, Family.PROMPT):
        out += [n for n, s in METHODS.items()
                if s.family == fam and not s.trains_base_weights and not s.quantizes_base][:1]
    return out

FOLLOW_S = 5.0     # how often the view of a running study refreshes itself
# the ranges an opened hyperparameter is searched over (the learning rate's comes from each method)
OPEN_RANGES = {"r": [2, 32], "alpha": [4.0, 64.0], "dropout": [0.0, 0.3], "warmup_steps": [0, 10]}


def study_body(name: str, model: str, dataset: str, task: str, methods: list[str], ranks: str, budget_kind: str,
               budget: float, metric: str, opened: list[str], steps: int, batch: int, seq: int, eval_every: int,
               pruner: str, parallel: int) -> dict:
    """The study request the form describes (what POST /api/studies takes). `ranks`
    ('4, 16'): each method whose config has a rank is studied at each of them."""
    rank_list = []
    for part in (ranks or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise StudyError(f"ranks: {part!r} is not a positive whole number")
        rank_list.append(int(part))
    entries: list[Any] = []
    for m in methods or []:
        if rank_list and "r" in get_method(m).config_cls.model_fields:
            entries += [{"name": m, "r": r} for r in rank_list]
        else:
            entries.append(m)
    search = {k: OPEN_RANGES[k] for k in opened or []}
    if "warmup_steps" in search:
        search["warmup_steps"] = [0, max(1, int(steps) // 5)]
    body = {"name": name or "study", "methods": entries, "metric": metric, "pruner": pruner,
            "parallel": int(parallel),
            "budget": {"trials": int(budget)} if budget_kind == "trials" else {"gpu_hours": float(budget)},
            "base": {"model": model, "task": task, "dataset": {"name": dataset},
                     "training": {"max_steps": int(steps), "batch_size": int(batch), "max_seq_len": int(seq),
                                  "eval_every": int(eval_every)}}}
    if search:
        body["search"] = search
    return body


def study_choices(rows: list[dict]) -> list[tuple[str, int]]:
    return [(f"#{r['id']} {r['name']} ({r['status']}, {', '.join(r['methods'])})", r["id"]) for r in rows]


def status_text(st: dict) -> str:
    n = len(st["trials"])
    budget = st["budget"]
    total = budget.get("trials") or f"{budget.get('gpu_hours')} GPU-hours"
    line = (f"**Study #{st['id']} {st['name']}: {st['status']}** · metric {st['metric']} ({st['direction']}) · "
            f"{n} trial(s) of {total} · pruner {st['pruner'].replace('_', ' ')}")
    if st.get("error"):
        line += f"  \n{st['error']}"
    return line


class StudiesTab:
    """The Studies tab's components (built inside the current gr.Tab) and its events."""

    def __init__(self, ctx: Ctx):
        import pandas as pd

        self.ctx = ctx
        with gr.Accordion("New study", open=True, elem_id="study-new"):
            with gr.Row():
                self.name = gr.Textbox("study", label="Name", elem_id="study-name")
                self.model = gr.Dropdown(MODEL_CHOICES, value=DEFAULT_MODEL, label="Model", allow_custom_value=True,
                                         elem_id="study-model")
                self.dataset = gr.Dropdown(list(BUNDLED_DATASETS), value="demo-sentiment", label="Dataset",
                                           elem_id="study-dataset")
                self.task = gr.Radio(["classification", "causal_lm"], value="classification", label="Task",
                                     elem_id="study-task")
            with gr.Row():
                self.methods = gr.Dropdown(list(METHODS), value=default_methods(), multiselect=True, label="Methods",
                                           elem_id="study-methods", scale=3)
                self.ranks = gr.Textbox("", label="Ranks (optional, e.g. 4, 16)", elem_id="study-ranks", scale=1)
                self.metric = gr.Dropdown(list(METRIC_DIRECTION), value="accuracy", label="Metric",
                                          elem_id="study-metric", scale=1)
            with gr.Row():
                self.budget_kind = gr.Radio(["trials", "gpu_hours"], value="trials", label="Budget in",
                                            elem_id="study-budget-kind")
                self.budget = gr.Number(32, label="Budget (split evenly across methods)", elem_id="study-budget")
                self.parallel = gr.Number(4, precision=0, label="Trials at once", elem_id="study-parallel")
                self.pruner = gr.Dropdown(["successive_halving", "hyperband", "none"], value="successive_halving",
                                          label="Pruner", elem_id="study-pruner")
                self.opened = gr.CheckboxGroup(list(OPEN_RANGES), value=[], label="Also search (learning rate always)",
                                               elem_id="study-opened")
            with gr.Row():
                self.steps = gr.Number(30, precision=0, label="Steps per trial", elem_id="study-steps")
                self.batch = gr.Number(8, precision=0, label="Batch size", elem_id="study-batch")
                self.seq = gr.Number(64, precision=0, label="Max sequence length", elem_id="study-seq")
                self.eval_every = gr.Number(10, precision=0, label="Evaluate every (steps)", elem_id="study-eval-every")
            self.create = gr.Button("Start study", variant="primary", elem_id="study-create")
        self.create_msg = gr.Markdown(elem_id="study-create-msg")
        with gr.Row():
            self.study = gr.Dropdown([], label="Study", elem_id="study-select", scale=4)
            self.refresh = gr.Button("Refresh", elem_id="study-refresh", scale=1)
            self.winners = gr.Button("Compare the winners", elem_id="study-compare", scale=1)
            self.cancel = gr.Button("Cancel study", variant="stop", elem_id="study-cancel", scale=1)
        self.status = gr.Markdown(elem_id="study-status")
        self.best = gr.Dataframe(pd.DataFrame(columns=study_charts.BEST_COLUMNS), interactive=False,
                                 label="Each method's best run", elem_id="study-best", wrap=True)
        with gr.Row():
            self.lr_plot = gr.Plot(label="Metric vs learning rate", elem_id="study-lr")
            self.prune_plot = gr.Plot(label="Pruning history", elem_id="study-pruning")
        with gr.Row():
            self.params_plot = gr.Plot(label="Best runs vs trainable parameters", elem_id="study-pareto-params")
            self.memory_plot = gr.Plot(label="Best runs vs peak memory", elem_id="study-pareto-memory")
        self.importance_plot = gr.Plot(label="Parameter importance", elem_id="study-importance")
        self.trials = gr.Dataframe(pd.DataFrame(columns=study_charts.TRIAL_COLUMNS), interactive=False,
                                   label="Trials", elem_id="study-trials", wrap=True)

    def view(self, study_id: Optional[int], request: Optional[gr.Request]) -> dict:
        import pandas as pd

        outs = [self.status, self.best, self.lr_plot, self.prune_plot, self.params_plot, self.memory_plot,
                self.importance_plot, self.trials]
        if not study_id:
            return {c: gr.skip() for c in outs} | {self.status: "Pick a study, or start one above."}
        try:
            st = studies.get_study(self.ctx.settings, int(study_id), owner=self.ctx.visible_owner(request))
        except service.NotFound as e:
            return {c: gr.skip() for c in outs} | {self.status: str(e)}
        params_fig, memory_fig, _front = study_charts.pareto_charts(st)
        return {self.status: status_text(st),
                self.best: pd.DataFrame(study_charts.best_table(st), columns=study_charts.BEST_COLUMNS),
                self.lr_plot: study_charts.lr_curve(st), self.prune_plot: study_charts.pruning_history(st),
                self.params_plot: params_fig, self.memory_plot: memory_fig,
                self.importance_plot: study_charts.importance_chart(study_charts.importances(self.ctx.settings, st)),
                self.trials: pd.DataFrame(study_charts.trials_table(st), columns=study_charts.TRIAL_COLUMNS)}

    def wire(self, demo: gr.Blocks, tabs: gr.Tabs, compare_runs: gr.Dropdown) -> None:
        ctx = self.ctx
        outs = [self.status, self.best, self.lr_plot, self.prune_plot, self.params_plot, self.memory_plot,
                self.importance_plot, self.trials]

        def choices(selected=None, request: gr.Request = None):
            rows = studies.list_studies(ctx.settings, owner=ctx.visible_owner(request))
            ids = [r["id"] for r in rows]
            value = selected if selected in ids else (ids[0] if ids else None)
            return gr.update(choices=study_choices(rows), value=value)
        demo.load(choices, None, self.study)
        self.refresh.click(choices, self.study, self.study).then(
            lambda sid, request: self.view(sid, request), self.study, outs)
        self.study.change(lambda sid, request: self.view(sid, request), self.study, outs)

        def on_tick(sid, request: gr.Request = None):
            """While the picked study runs, its view follows it; a finished one is left alone."""
            if not sid:
                return {c: gr.skip() for c in outs}
            try:
                running = studies.get_study(ctx.settings, int(sid), owner=ctx.visible_owner(request))["status"]
            except service.NotFound:
                return {c: gr.skip() for c in outs}
            return self.view(sid, request) if running == "running" else {c: gr.skip() for c in outs}
        gr.Timer(FOLLOW_S).tick(on_tick, self.study, outs, show_progress="hidden")

        def on_create(*args, request: gr.Request = None):
            try:
                body = study_body(*args)
                sid = studies.create_study(ctx.settings, body, owner=ctx.user(request))
            except (StudyError, StudyStorageError) as e:
                return f"**Not started:** {e}", gr.skip()
            rows = studies.list_studies(ctx.settings, owner=ctx.visible_owner(request))
            return f"Study #{sid} started.", gr.update(choices=study_choices(rows), value=sid)
        self.create.click(on_create, [self.name, self.model, self.dataset, self.task, self.methods, self.ranks,
                                      self.budget_kind, self.budget, self.metric, self.opened, self.steps,
                                      self.batch, self.seq, self.eval_every, self.pruner, self.parallel],
                          [self.create_msg, self.study])

        def on_cancel(sid, request: gr.Request = None):
            if not sid:
                return "Pick a study first."
            try:
                res = studies.cancel_study(ctx.settings, int(sid), owner=ctx.visible_owner(request))
            except service.NotFound as e:
                return str(e)
            return f"Study #{sid} {res['status']}; {res['runs_cancelled']} queued or running trial run(s) cancelled."
        self.cancel.click(on_cancel, self.study, self.create_msg).then(
            lambda sid, request: self.view(sid, request), self.study, outs)

        def on_winners(sid, request: gr.Request = None):
            from .common import run_choices

            if not sid:
                return gr.skip(), "Pick a study first."
            try:
                st = studies.get_study(ctx.settings, int(sid), owner=ctx.visible_owner(request))
            except service.NotFound as e:
                return gr.skip(), str(e)
            ids = studies.winners(st)
            if len(ids) < 2:
                return gr.skip(), "Compare needs a best run of at least two methods."
            runs = ctx.visible_runs(request)
            labels = {r["id"]: c for r, c in zip(runs, run_choices(runs, statuses=()))}
            return (gr.update(choices=run_choices(runs, statuses=()), value=[labels[i] for i in ids if i in labels]),
                    f"Comparing the best run of each method: {', '.join(f'#{i}' for i in ids)}.")
        self.winners.click(on_winners, self.study, [compare_runs, self.create_msg]).then(
            lambda: gr.Tabs(selected="compare"), None, tabs)
