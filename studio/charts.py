"""Plotly figures for the studio (all charts are plotly)."""

from __future__ import annotations

from typing import Optional

import plotly.graph_objects as go

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


def loss_curves(series: dict[str, list[dict]], x: str = "step", y: str = "loss", title: str = "Training loss",
                ylabel: Optional[str] = None, xlabel: Optional[str] = None) -> go.Figure:
    """One line per run: `series` maps a run label to its metric rows."""
    fig = go.Figure()
    for label, rows in series.items():
        pts = [(r.get(x), r.get(y)) for r in rows if r.get(y) is not None and r.get(x) is not None]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 name=label, marker=dict(size=4)))
    fig.update_layout(height=340, margin=dict(l=40, r=10, t=40, b=30), title=title, xaxis_title=xlabel or x,
                      yaxis_title=ylabel or y, template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def task_names(rows: list[dict], metric: str) -> list[str]:
    """Tasks of a multi-task run whose evaluations carry `eval/<task>/<metric>`, in first-seen order."""
    out: list[str] = []
    for r in rows:
        for k in (r.get("eval") or {}):
            if k.startswith("eval/") and k.endswith(f"/{metric}") and k.count("/") >= 2:
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


def metric_vs_trainable(points: list[dict], metric: str) -> go.Figure:
    """The LoRA paper's Figure 2 view: evaluation metric against the number of
    trainable parameters, log x axis; one marker per run, grouped by method."""
    fig = go.Figure()
    by_method: dict[str, list[dict]] = {}
    for p in points:
        if p.get("n_trainable") and p.get("metric") is not None:
            by_method.setdefault(p["method"], []).append(p)
    for method, pts in by_method.items():
        pts = sorted(pts, key=lambda p: p["n_trainable"])
        fig.add_trace(go.Scatter(x=[p["n_trainable"] for p in pts], y=[p["metric"] for p in pts],
                                 mode="markers+lines+text", name=method, text=[p["label"] for p in pts],
                                 textposition="top center", marker=dict(size=10)))
    fig.update_layout(height=340, margin=dict(l=40, r=10, t=40, b=30), title=f"{metric} vs trainable parameters",
                      xaxis=dict(type="log", title="trainable parameters (log)"), yaxis_title=metric,
                      template="plotly_white", legend=dict(orientation="h", y=-0.2))
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
