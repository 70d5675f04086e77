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
                ylabel: Optional[str] = None) -> go.Figure:
    """One line per run: `series` maps a run label to its metric rows."""
    fig = go.Figure()
    for label, rows in series.items():
        pts = [(r.get(x), r.get(y)) for r in rows if r.get(y) is not None and r.get(x) is not None]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 name=label, marker=dict(size=4)))
    fig.update_layout(height=340, margin=dict(l=40, r=10, t=40, b=30), title=title, xaxis_title=x,
                      yaxis_title=ylabel or y, template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def eval_curves(series: dict[str, list[dict]], metric: str) -> go.Figure:
    flat = {label: [{"step": r["step"], metric: (r.get("eval") or {}).get(metric)} for r in rows if r.get("eval")]
            for label, rows in series.items()}
    return loss_curves(flat, y=metric, title=f"Validation {metric}")
