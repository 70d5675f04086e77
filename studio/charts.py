"""Plotly figures for the studio (all charts are plotly).

Loss curves can be smoothed with TensorBoard's debiased exponential moving
average (tensorboard/plugins/scalar: s_t = w·s_{t-1} + (1-w)·x_t, divided by
1 - w^t to undo the pull towards the zero start), the raw curve drawn faintly
behind. The Pareto charts mark the runs no other run beats on both axes
(studio.compare.pareto_front)."""

from __future__ import annotations

import math
from typing import Optional

import plotly.graph_objects as go
from plotly.colors import qualitative

GIB = 1024 ** 3
ROW_LABELS = {"cuda_context": "CUDA context", "weights": "Weights", "gradients": "Gradients",
              "hidden_states": "Activations", "optimizer": "Optimizer states"}
ROW_COLORS = {"cuda_context": "#9aa5b1", "weights": "#3b82f6", "gradients": "#f59e0b",
              "hidden_states": "#10b981", "optimizer": "#ef4444"}


def memory_bar(rows: dict, gpu_bytes: Optional[int] = None, gpu_name: str = "", title: str = "") -> go.Figure:
    """A stacked bar of the estimate's rows in GiB, with the chosen GPU as a line."""
    fig = go.Figure()
    for key, label in ROW_LABELS.items():
        v = rows.get(key, 0) / GIB
        fig.add_trace(go.Bar(name=label, x=["estimate"], y=[v], marker_color=ROW_COLORS[key],
                             hovertemplate=f"{label}: %{{y:.3f}} GiB<extra></extra>"))
    if gpu_bytes:
        fig.add_hline(y=gpu_bytes / GIB, line_dash="dash", line_color="#111827",
                      annotation_text=f"{gpu_name} ({gpu_bytes / GIB:.0f} GiB)", annotation_position="top left")
    fig.update_layout(barmode="stack", height=380, margin=dict(l=40, r=10, t=40, b=30), title=title,
                      yaxis_title="GiB", legend=dict(orientation="h", y=-0.1), template="plotly_white")
    return fig


PALETTE = qualitative.Plotly
SMOOTHING_MAX = 0.99
SMOOTHING_DEFAULT = 0.6        # TensorBoard's default weight


def is_number(v) -> bool:
    """A real, finite number (not a bool, not a list such as an evaluation's `samples`)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ema_smooth(values: list, weight: float) -> list:
    """TensorBoard's smoothing: an exponential moving average started at 0 and debiased,
    s_t = w·s_{t-1} + (1-w)·x_t, shown as s_t / (1 - w^n) with n the finite points so far.
    Weight 0 returns the values; missing or non-finite values pass through and do not count."""
    if not 0 <= weight <= SMOOTHING_MAX:
        raise ValueError(f"smoothing: weight must be between 0 and {SMOOTHING_MAX}, not {weight}")
    out, last, n = [], 0.0, 0
    for v in values:
        if not is_number(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight ** n))
    return out


def _raw_path(xs: list, ys: list) -> str:
    """An SVG path through the raw points, in data coordinates (a layout shape: drawn
    behind the traces without being one, so each run stays one trace)."""
    return "M " + " L ".join(f"{x},{y}" for x, y in zip(xs, ys))


def loss_curves(series: dict[str, list[dict]], x: str = "step", y: str = "loss", title: str = "Training loss",
                ylabel: Optional[str] = None, xlabel: Optional[str] = None, smoothing: float = 0.0) -> go.Figure:
    """One line per run: `series` maps a run label to its metric rows. With `smoothing`
    (0-0.99) each line is the debiased EMA of its points, its raw curve drawn faintly behind
    and its raw value in the hover."""
    fig = go.Figure()
    for i, (label, rows) in enumerate(series.items()):
        pts = [(r.get(x), r.get(y)) for r in rows if is_number(r.get(y)) and r.get(x) is not None]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        color = PALETTE[i % len(PALETTE)]
        if smoothing and len(pts) > 1:
            fig.add_shape(type="path", path=_raw_path(xs, ys), xref="x", yref="y", layer="below",
                          line=dict(color=color, width=1), opacity=0.3)
            fig.add_trace(go.Scatter(x=xs, y=ema_smooth(ys, smoothing), customdata=ys, mode="lines", name=label,
                                     line=dict(color=color),
                                     hovertemplate=f"{label}<br>%{{x}}: %{{y:.4f}} (raw %{{customdata:.4f}})"
                                                   f"<extra></extra>"))
        else:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=label, marker=dict(size=4),
                                     line=dict(color=color)))
    shown = f"{title} (smoothed {smoothing:g})" if smoothing else title
    fig.update_layout(height=340, margin=dict(l=40, r=10, t=40, b=30), title=shown, xaxis_title=xlabel or x,
                      yaxis_title=ylabel or y, template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def task_names(rows: list[dict], metric: str) -> list[str]:
    """Tasks of a multi-task run whose evaluations carry `eval/<task>/<metric>`, in first-seen order."""
    out: list[str] = []
    for r in rows:
        for k, v in (r.get("eval") or {}).items():
            if k.startswith("eval/") and k.endswith(f"/{metric}") and k.count("/") >= 2 and is_number(v):
                task = k[len("eval/"):-len(metric) - 1]
                if task not in out:
                    out.append(task)
    return out


def eval_curves(series: dict[str, list[dict]], metric: str, x: str = "step",
                xlabel: Optional[str] = None) -> go.Figure:
    """One line per run; a multi-task run also gets one line per task (`<run> · <task>`),
    its own line being the average over tasks."""
    flat = {}
    for label, rows in series.items():
        tasks = task_names(rows, metric)
        flat[f"{label} · average" if tasks else label] = [{x: r.get(x), metric: (r.get("eval") or {}).get(metric)}
                                                          for r in rows if r.get("eval")]
        for task in tasks:
            flat[f"{label} · {task}"] = [{x: r.get(x), metric: r["eval"].get(f"eval/{task}/{metric}")}
                                         for r in rows if r.get("eval")]
    return loss_curves(flat, x=x, y=metric, title=f"Validation {metric}", xlabel=xlabel)


def empty(title: str = "", message: str = "nothing to show yet") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=14, color="#6b7280"))
    fig.update_layout(height=300, title=title, template="plotly_white", xaxis=dict(visible=False),
                      yaxis=dict(visible=False), margin=dict(l=20, r=10, t=40, b=20))
    return fig


def pareto_chart(points: list[dict], metric: str, front: list, *, title: str, x_title: str,
                 log_x: bool = False) -> go.Figure:
    """Metric against a cost (trainable parameters, peak memory): one marker per run
    (`points`: {id, label, method, x, y, note}), grouped by method; the runs in `front`
    (ids on the Pareto frontier, cheapest first) ringed and joined by the frontier line."""
    fig = go.Figure()
    shown = [p for p in points if is_number(p.get("x")) and is_number(p.get("y")) and (p["x"] > 0 or not log_x)]
    by_method: dict[str, list[dict]] = {}
    for p in shown:
        by_method.setdefault(p["method"], []).append(p)
    for i, (method, pts) in enumerate(by_method.items()):
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in pts], y=[p["y"] for p in pts], mode="markers+text", name=method,
            text=[p["label"] for p in pts], textposition="top center", customdata=[p.get("note") or "" for p in pts],
            marker=dict(size=10, color=PALETTE[i % len(PALETTE)],
                        symbol=["diamond" if "estimated" in (p.get("note") or "") else "circle" for p in pts]),
            hovertemplate="%{text}<br>%{x:.4g} %{customdata}<br>" + metric + " %{y:.4f}<extra></extra>"))
    by_id = {p["id"]: p for p in shown}
    fr = [by_id[i] for i in front if i in by_id]
    if fr:
        fig.add_trace(go.Scatter(x=[p["x"] for p in fr], y=[p["y"] for p in fr], mode="lines+markers",
                                 name="Pareto frontier", line=dict(color="#111827", dash="dot", shape="hv"),
                                 marker=dict(size=16, symbol="circle-open", color="#111827", line=dict(width=2)),
                                 hoverinfo="skip"))
    fig.update_layout(height=340, margin=dict(l=40, r=10, t=40, b=30), title=title,
                      xaxis=dict(type="log" if log_x else "linear", title=x_title), yaxis_title=metric,
                      template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def metric_vs_trainable(points: list[dict], metric: str, front: Optional[list] = None) -> go.Figure:
    """The LoRA paper's Figure 2 view: evaluation metric against the number of
    trainable parameters, log x axis; one marker per run, grouped by method."""
    return pareto_chart(points, metric, front or [], title=f"{metric} vs trainable parameters",
                        x_title="trainable parameters (log)", log_x=True)


def metric_vs_memory(points: list[dict], metric: str, front: Optional[list] = None) -> go.Figure:
    """Evaluation metric against peak memory in GiB: measured where the run recorded
    it (circles), else the estimate (diamonds); each point's hover names which."""
    return pareto_chart(points, metric, front or [], title=f"{metric} vs peak memory",
                        x_title="peak GiB (measured where recorded, else estimated ◆)")


GEN_LABELS = {"bleu": "BLEU (0-100)", "rouge_l": "ROUGE-L F (0-1)", "exact_match": "exact match (0-1)"}


def _gen_value(ev: dict, metric: str, tasks: list[str]):
    """The run's own figure, else the mean over its tasks' (a multi-task run reporting only those)."""
    if is_number(ev.get(metric)):
        return ev[metric]
    per_task = [ev.get(f"eval/{t}/{metric}") for t in tasks]
    per_task = [v for v in per_task if is_number(v)]
    return sum(per_task) / len(per_task) if per_task else None


def generation_curves(series: dict[str, list[dict]], x: str = "step", xlabel: Optional[str] = None) -> go.Figure:
    """Small multiples of the generation metrics (BLEU, ROUGE-L, exact match) over `x`:
    one line per run, and per task for a multi-task run (its own line the average)."""
    from plotly.subplots import make_subplots

    names = list(GEN_LABELS)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[GEN_LABELS[n] for n in names])
    lines: list[str] = []
    for col, metric in enumerate(names, start=1):
        for label, rows in series.items():
            tasks = task_names(rows, metric)
            keyed = [(f"{label} · average" if tasks else label, None)] + \
                    [(f"{label} · {t}", f"eval/{t}/{metric}") for t in tasks]
            for name, key in keyed:
                vals = [(r.get(x), _gen_value(r["eval"], metric, tasks) if key is None else r["eval"].get(key))
                        for r in rows if r.get("eval") and r.get(x) is not None]
                pts = [(xv, yv) for xv, yv in vals if is_number(yv)]
                if not pts:
                    continue
                if name not in lines:
                    lines.append(name)
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                         name=name, legendgroup=name,
                                         marker=dict(size=5),
                                         line=dict(color=PALETTE[lines.index(name) % len(PALETTE)]),
                                         meta=metric), row=1, col=col)
    seen: set = set()
    for tr in fig.data:         # one legend entry per line
        tr.showlegend = tr.name not in seen
        seen.add(tr.name)
    fig.update_xaxes(title_text=xlabel or x)
    fig.update_layout(height=320, margin=dict(l=40, r=10, t=50, b=30), template="plotly_white",
                      title="Generation metrics", legend=dict(orientation="h", y=-0.25))
    return fig


def memory_compare(labels: list[str], estimated: list, measured: list, measured_kind: str = "",
                   estimated_kinds: Optional[list] = None, measured_kinds: Optional[list] = None) -> go.Figure:
    """Estimated against measured peak memory per run, in GiB. With `estimated_kinds` /
    `measured_kinds` (one label per run, e.g. 'estimated CPU', 'measured CUDA'),
    each kind is its own series, so figures of different kinds are never one series."""
    fig = go.Figure()
    est_kinds = estimated_kinds or ["estimated"] * len(labels)
    mea_kinds = measured_kinds or [f"measured{' (' + measured_kind + ')' if measured_kind else ''}"] * len(labels)
    palettes = (("#3b82f6", "#60a5fa", "#1d4ed8"), ("#f59e0b", "#fbbf24", "#b45309"))
    for values, kinds, colors in ((estimated, est_kinds, palettes[0]), (measured, mea_kinds, palettes[1])):
        order = [k for i, k in enumerate(kinds) if k and k not in kinds[:i]]
        for n, kind in enumerate(order):
            fig.add_trace(go.Bar(name=kind, x=labels,
                                 y=[v / GIB if v is not None and k == kind else None for v, k in zip(values, kinds)],
                                 marker_color=colors[n % len(colors)]))
    fig.update_layout(barmode="group", height=340, margin=dict(l=40, r=10, t=40, b=30),
                      title="Peak memory: estimated vs measured", yaxis_title="GiB", template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def simple_bars(labels: list[str], values: list, title: str, ylabel: str, color: str = "#10b981") -> go.Figure:
    fig = go.Figure(go.Bar(x=labels, y=values, marker_color=color))
    fig.update_layout(height=300, margin=dict(l=40, r=10, t=40, b=30), title=title, yaxis_title=ylabel,
                      template="plotly_white")
    return fig


def throughput_bars(labels: list[str], tokens_per_s: list, world_sizes: list[int]) -> go.Figure:
    """Tokens/s per run, and beside it tokens/s per device (divided by the run's world size)."""
    per = [None if v is None else v / max(1, n) for v, n in zip(tokens_per_s, world_sizes)]
    fig = go.Figure([go.Bar(name="tokens/s", x=labels, y=tokens_per_s, marker_color="#10b981"),
                     go.Bar(name="tokens/s per device", x=labels, y=per, marker_color="#6ee7b7")])
    fig.update_layout(barmode="group", height=300, margin=dict(l=40, r=10, t=40, b=30), title="Throughput",
                      yaxis_title="tokens/s", template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def similarity_heatmap(matrix: list[list[float]], module: str, label_a: str, label_b: str) -> go.Figure:
    """φ(i, j) of two LoRA adapters' A matrices for one module (LoRA paper, Figure 3)."""
    n_i, n_j = len(matrix), len(matrix[0]) if matrix else 0
    fig = go.Figure(go.Heatmap(z=matrix, x=list(range(1, n_j + 1)), y=list(range(1, n_i + 1)), zmin=0, zmax=1,
                               colorscale="Viridis", colorbar=dict(title="φ")))
    fig.update_layout(height=380, margin=dict(l=50, r=10, t=50, b=40), template="plotly_white",
                      title=f"Subspace similarity · {module}", xaxis_title=f"j (top-j of {label_b})",
                      yaxis_title=f"i (top-i of {label_a})")
    return fig
