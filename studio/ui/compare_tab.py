"""The Compare tab: two or more runs side by side — curves against step,
tokens seen or epoch (training loss smoothed as in TensorBoard), the metric
against trainable parameters and against peak memory with each Pareto frontier
marked and listed, generation metrics (BLEU, ROUGE-L, exact match), memory,
speed, adapter size, the config differences, a CSV of the table, and the
subspace similarity of two LoRA adapters, and a ranking by any benchmark metric
(lm-evaluation-harness jobs of the Benchmarks tab)."""

from __future__ import annotations

import gradio as gr

from workers.settings import Settings

from .. import benchmarks, charts, compare, d90, service
from .common import Ctx, run_choices, write_download

COMPARE_STATUSES = ("succeeded", "running", "failed", "cancelled")
BENCH_COLUMNS = ["rank", "run", "method", "value ± stderr"]


def compare_view(settings: Settings, ids: list[int], x_axis: str, diff_only: bool,
                 smoothing: float = 0.0) -> dict:
    """Everything the Compare tab shows for runs `ids` (charts, tables, CSV path, LoRA modules)."""
    runs = service.get_runs(settings, ids)
    x = compare.X_AXES.get(x_axis, "step")
    labels = [compare.run_label(r) for r in runs]
    rows = {r["id"]: service.get_metrics(settings, r["id"]) for r in runs}
    metrics = {compare.run_label(r): compare.with_x(rows[r["id"]], x) for r in runs}
    metric = compare.metric_name_of(runs)
    par = compare.pareto_of(runs, metric)
    left_out = len(runs) - len(par["points"]["params"])
    cfg_header, cfg_rows = compare.config_table(runs, diff_only)
    table = compare.comparison_table(runs, rows)
    csv_path = write_download(compare.to_csv(compare.TABLE_COLUMNS, table).encode(), "comparison.csv") if runs else None
    loras = [r for r in runs if compare.is_lora_run(r)]
    mem = [compare.memory_figures(r) for r in runs]     # each figure with its kind (estimated CPU, ...)
    note = f"  \n_{left_out} run(s) ranked by another metric are left out._" if left_out else ""
    gen = any(compare.has_generation_metrics(m) for m in rows.values())
    return {
        "runs": runs,
        "loss": charts.loss_curves(metrics, x="x", xlabel=x_axis, title="Training loss", smoothing=smoothing),
        "eval": charts.eval_curves(metrics, metric, x="x", xlabel=x_axis),
        "tradeoff": charts.metric_vs_trainable(par["points"]["params"], metric, par["front"]["params"]),
        "pareto_memory": charts.metric_vs_memory(par["points"]["memory"], metric, par["front"]["memory"]),
        "front_params": compare.front_markdown(par["points"]["params"], par["front"]["params"], metric,
                                               "trainable parameters") + note,
        "front_memory": compare.front_markdown(par["points"]["memory"], par["front"]["memory"], metric,
                                               "peak memory") + note,
        "pareto": par,
        "generation": charts.generation_curves(metrics, x="x", xlabel=x_axis) if gen else None,
        "memory": charts.memory_compare(labels, [f["estimated"] for f in mem], [f["measured"] for f in mem],
                                        estimated_kinds=[f["estimated_kind"] for f in mem],
                                        measured_kinds=[f["measured_kind"] for f in mem]),
        "speed": charts.throughput_bars(labels, [r.get("tokens_per_s") for r in runs],
                                        [compare.world_size_of(r) for r in runs]),
        "size": charts.simple_bars(labels, [((r.get("adapter") or {}).get("size") or 0) / 1024 for r in runs],
                                   "Adapter size", "KiB", color="#8b5cf6"),
        "table": table, "cfg_header": cfg_header, "cfg_rows": cfg_rows, "csv": csv_path,
        "lora_pair": loras[:2] if len(loras) >= 2 else [],
        "d90": d90.compute_d90(runs),
    }


def similarity_of(settings: Settings, pair: list[dict]) -> tuple[dict, str]:
    """({'a', 'b', 'phi'} for the heatmap, or {}; a note when it cannot be computed)."""
    if not pair:
        return {}, ""
    a, b = pair
    try:
        return {"a": compare.run_label(a), "b": compare.run_label(b),
                "phi": compare.subspace_similarity(settings, a["id"], b["id"])}, ""
    except Exception as e:   # different base models, no shared module...
        return {}, f"  \nSubspace similarity unavailable: {e}"


class CompareTab:
    """The Compare tab's components (built inside the current gr.Tab) and its events."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        with gr.Row():
            self.runs = gr.Dropdown([], multiselect=True, label="Runs to compare (two or more)",
                                    elem_id="compare-runs", scale=4)
            self.x = gr.Radio(list(compare.X_AXES), value="step", label="x axis", elem_id="compare-x", scale=2)
            self.smoothing = gr.Slider(0, charts.SMOOTHING_MAX, value=charts.SMOOTHING_DEFAULT, step=0.01,
                                       label="Loss smoothing (EMA weight; 0 = raw)", elem_id="compare-smoothing",
                                       scale=2)
            self.refresh = gr.Button("Refresh", elem_id="compare-refresh", scale=1)
        self.msg = gr.Markdown(elem_id="compare-msg")
        with gr.Row():
            self.loss = gr.Plot(label="Loss", elem_id="compare-loss")
            self.eval = gr.Plot(label="Validation metric", elem_id="compare-eval")
        with gr.Row():
            with gr.Column():
                self.tradeoff = gr.Plot(label="Metric vs trainable parameters", elem_id="compare-tradeoff")
                self.front_params = gr.Markdown(elem_id="compare-front-params")
            with gr.Column():
                self.pareto_memory = gr.Plot(label="Metric vs peak memory", elem_id="compare-pareto-memory")
                self.front_memory = gr.Markdown(elem_id="compare-front-memory")
        with gr.Group(visible=False) as self.gen_group:
            self.generation = gr.Plot(label="Generation metrics", elem_id="compare-generation")
        with gr.Row():
            self.memory = gr.Plot(label="Memory", elem_id="compare-memory")
        with gr.Row():
            self.speed = gr.Plot(label="Throughput", elem_id="compare-speed")
            self.size = gr.Plot(label="Adapter size", elem_id="compare-size")
        self.table = gr.Dataframe(headers=compare.TABLE_COLUMNS, interactive=False, label="Side by side",
                                  elem_id="compare-table", wrap=True)
        self.csv = gr.DownloadButton("Download table (CSV)", value=None, interactive=False, elem_id="compare-csv")
        with gr.Row():
            self.bench_metric = gr.Dropdown([], label="Rank by benchmark (task / metric)",
                                            elem_id="compare-bench-metric", scale=2)
        self.bench_rank = gr.Dataframe(headers=BENCH_COLUMNS, interactive=False, label="Benchmark ranking",
                                       elem_id="compare-bench-rank", wrap=True)
        self.diff = gr.Checkbox(True, label="differences only", elem_id="compare-diff")
        self.cfg = gr.Dataframe(interactive=False, label="Configs", elem_id="compare-config", wrap=True)
        with gr.Group(visible=False) as self.sim_group:
            gr.Markdown("**Subspace similarity of the two LoRA adapters' A matrices** "
                        "(Hu et al. 2021, Sec. 7.2): φ(i, j) = ‖U_i^T U_j‖²_F / min(i, j)")
            self.sim_module = gr.Dropdown([], label="module", elem_id="similarity-module")
            self.sim_plot = gr.Plot(label="Subspace similarity", elem_id="similarity-plot")
        self.sim_data = gr.State({})
        with gr.Group(visible=False) as self.d90_group:      # a sweep over d beside full fine-tuning (studio.d90)
            self.d90_note = gr.Markdown(elem_id="compare-d90-note")
            self.d90_plot = gr.Plot(label="d90: metric vs subspace dimension", elem_id="compare-d90")
        self.charts = {"loss": self.loss, "eval": self.eval, "tradeoff": self.tradeoff, "memory": self.memory,
                       "pareto_memory": self.pareto_memory, "speed": self.speed, "size": self.size}

    def empty(self) -> dict:
        e = charts.empty("", "pick two or more runs")
        return {self.msg: "Pick two or more runs to compare.", **{c: e for c in self.charts.values()},
                self.front_params: "", self.front_memory: "", self.gen_group: gr.update(visible=False),
                self.generation: None,
                self.table: None, self.csv: gr.update(value=None, interactive=False), self.cfg: None,
                self.sim_group: gr.update(visible=False), self.sim_module: gr.update(choices=[], value=None),
                self.sim_plot: None, self.sim_data: {}, **self.d90_outputs(None)}

    def d90_outputs(self, res) -> dict:
        if res is None or not res.points:
            return {self.d90_group: gr.update(visible=False), self.d90_note: "", self.d90_plot: None}
        note = f"**d90 = {res.d90}**" if res.d90 is not None else "**d90**"
        return {self.d90_group: gr.update(visible=True), self.d90_plot: d90.d90_figure(res),
                self.d90_note: "  \n".join([note, *res.notes])}

    def view(self, ids: list[int], x_axis: str, diff_only: bool, smoothing: float = 0.0) -> dict:
        import pandas as pd

        settings = self.ctx.settings
        v = compare_view(settings, ids, x_axis, diff_only, smoothing)
        header = v["cfg_header"]
        cfg = pd.DataFrame(v["cfg_rows"] or [["(no differences)"] + [""] * (len(header) - 1)], columns=header)
        sim, note = similarity_of(settings, v["lora_pair"])
        mods = list(sim.get("phi", {}))
        heat = charts.similarity_heatmap(sim["phi"][mods[0]], mods[0], sim["a"], sim["b"]) if mods else None
        return {self.msg: f"Comparing {len(v['runs'])} runs." + note,
                **{comp: v[key] for key, comp in self.charts.items()},
                self.front_params: v["front_params"], self.front_memory: v["front_memory"],
                self.gen_group: gr.update(visible=v["generation"] is not None), self.generation: v["generation"],
                self.table: pd.DataFrame(v["table"], columns=compare.TABLE_COLUMNS),
                self.csv: gr.update(value=v["csv"], interactive=bool(v["csv"])), self.cfg: cfg,
                self.sim_group: gr.update(visible=bool(mods)),
                self.sim_module: gr.update(choices=mods, value=mods[0] if mods else None),
                self.sim_plot: heat, self.sim_data: sim, **self.d90_outputs(v["d90"])}

    def wire(self, demo: gr.Blocks) -> None:
        ctx = self.ctx

        def choices(request: gr.Request = None):
            return gr.update(choices=run_choices(ctx.visible_runs(request), statuses=COMPARE_STATUSES))
        self.refresh.click(choices, None, self.runs)
        demo.load(choices, None, self.runs)

        outs = [self.msg, *self.charts.values(), self.front_params, self.front_memory, self.gen_group,
                self.generation, self.table, self.csv, self.cfg, self.sim_group, self.sim_module,
                self.sim_plot, self.sim_data, self.d90_group, self.d90_note, self.d90_plot]
        ins = [self.runs, self.x, self.diff, self.smoothing]

        def visible_ids(sel, request):
            ids = compare.parse_run_ids(sel)
            if ctx.visible_owner(request) is not None:
                mine = {r["id"] for r in ctx.visible_runs(request)}
                ids = [i for i in ids if i in mine]
            return ids

        def on_compare(sel, x_axis, diff_only, smoothing, request: gr.Request = None):
            ids = visible_ids(sel, request)
            return self.empty() if len(ids) < 2 else self.view(ids, x_axis, diff_only, smoothing)
        for c in (self.runs, self.x, self.diff):
            c.change(on_compare, ins, outs)

        def on_smoothing(sel, x_axis, smoothing, request: gr.Request = None):
            """Only the loss chart changes with the smoothing weight."""
            ids = visible_ids(sel, request)
            if len(ids) < 2:
                return gr.skip()
            runs = service.get_runs(ctx.settings, ids)
            x = compare.X_AXES.get(x_axis, "step")
            metrics = {compare.run_label(r): compare.with_x(service.get_metrics(ctx.settings, r["id"]), x)
                       for r in runs}
            return charts.loss_curves(metrics, x="x", xlabel=x_axis, title="Training loss", smoothing=smoothing)
        self.smoothing.change(on_smoothing, [self.runs, self.x, self.smoothing], self.loss, trigger_mode="always_last",
                              show_progress="hidden")

        def bench_choices(sel, request: gr.Request = None):
            ids = visible_ids(sel, request)
            jobs = benchmarks.list_jobs(ctx.settings, run_ids=ids, owner=ctx.visible_owner(request)) if ids else []
            opts = compare.benchmark_choices(jobs)
            return gr.update(choices=opts, value=opts[0] if opts else None)
        self.runs.change(bench_choices, [self.runs], self.bench_metric)

        def on_bench(sel, choice, request: gr.Request = None):
            import pandas as pd

            ids = visible_ids(sel, request)
            if not ids or not choice:
                return None
            jobs = benchmarks.list_jobs(ctx.settings, run_ids=ids, owner=ctx.visible_owner(request))
            rows = compare.rank_by_benchmark(service.get_runs(ctx.settings, ids), benchmarks.latest_scores(jobs),
                                             choice)
            return pd.DataFrame(rows, columns=BENCH_COLUMNS) if rows else None
        self.bench_metric.change(on_bench, [self.runs, self.bench_metric], self.bench_rank)

        def on_module(mod, sim):
            if not mod or not sim or mod not in sim.get("phi", {}):
                return gr.skip()
            return charts.similarity_heatmap(sim["phi"][mod], mod, sim["a"], sim["b"])
        self.sim_module.change(on_module, [self.sim_module, self.sim_data], self.sim_plot)
