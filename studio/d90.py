"""The d90 view of the Compare tab (Aghajanyan et al. 2020, arXiv:2012.13255; after
Li et al. 2018, arXiv:1804.08838): runs that train in a random d-dimensional
subspace (a sweep over the method config's `d`, e.g. intrinsic_dimension) beside a
reference run that fine-tunes the full model on the same data. The figure plots
the metric against d on a log axis with a horizontal line at 90% of the
reference's metric, and marks d90: the smallest d whose run reaches that line.

Pure functions over the run dicts `service.get_run` returns, plus `d90_for_ids`
that reads them from the database. Which run is the reference is not decided by
a method's name: among the selected finished runs without a subspace dimension,
the one that trains the most parameters (full fine-tuning when it is selected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import plotly.graph_objects as go

from engine.methods import parse_method_config
from engine.train import primary_metric

FRACTION = 0.9
SUBSPACE_KEY = "d"        # the method-config field that names the subspace dimension
LOWER_IS_BETTER = ("eval_loss", "loss", "perplexity")


@dataclass
class D90:
    metric: str
    points: list = field(default_factory=list)    # (d, metric, label), sorted by d
    reference: Optional[dict] = None               # {"label", "method", "metric", "n_trainable"}
    threshold: Optional[float] = None              # FRACTION x the reference's metric
    d90: Optional[int] = None                      # smallest d reaching the threshold (None: none does)
    notes: list = field(default_factory=list)

    @property
    def applies(self) -> bool:
        """A sweep over d (two or more dimensions) beside a reference run."""
        return len(self.points) >= 2 and self.reference is not None


def subspace_dim(run: dict) -> Optional[int]:
    """The subspace dimension d of a run's method config (its default filled in by the
    method's config class), or None for methods without one."""
    try:
        cfg = parse_method_config((run.get("config") or {}).get("method"))
    except (ValueError, KeyError):
        return None
    d = getattr(cfg, SUBSPACE_KEY, None)
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


def _label(run: dict) -> str:
    return f"#{run['id']} {run['name']}"


def _data_of(run: dict) -> tuple:
    cfg = run.get("config") or {}
    return run.get("model"), repr(cfg.get("dataset"))


def compute_d90(runs: list[dict], fraction: float = FRACTION) -> D90:
    """d90 of the succeeded runs among `runs` (see the module docstring)."""
    done = [r for r in runs if r.get("status") == "succeeded" and r.get("best_metric") is not None]
    task = done[0].get("task", "classification") if done else "classification"
    names = {r.get("metric_name") for r in done} - {None}
    metric = next(iter(names)) if len(names) == 1 else primary_metric(task)[0]
    res = D90(metric=metric)
    if len(names) > 1:
        res.notes.append(f"the runs report different metrics ({', '.join(sorted(names))})")
        return res
    sweep = [r for r in done if subspace_dim(r) is not None]
    others = [r for r in done if subspace_dim(r) is None and r.get("n_trainable")]
    res.points = sorted((subspace_dim(r), float(r["best_metric"]), _label(r)) for r in sweep)
    if not others:
        if sweep:
            res.notes.append("add a full fine-tuning run on the same data as the reference for d90")
        return res
    ref = max(others, key=lambda r: r["n_trainable"])
    res.reference = {"label": _label(ref), "method": ref.get("method"), "metric": float(ref["best_metric"]),
                     "n_trainable": ref["n_trainable"]}
    if len(res.points) < 2:
        return res
    if metric in LOWER_IS_BETTER:
        res.notes.append(f"d90 needs a metric where higher is better (accuracy); these runs report {metric}")
        return res
    different = sorted({_label(r) for r in sweep if _data_of(r) != _data_of(ref)})
    if different:
        res.notes.append(f"not on the reference's model and data: {', '.join(different)}")
    res.threshold = fraction * res.reference["metric"]
    reached = [d for d, m, _ in res.points if m >= res.threshold]
    res.d90 = min(reached) if reached else None
    if res.d90 is None:
        res.notes.append(f"no d reaches {fraction:.0%} of the reference (largest tried: {res.points[-1][0]})")
    return res


def d90_figure(res: D90) -> go.Figure:
    """Metric against d (log x), the 90% line of the reference, and d90 marked."""
    fig = go.Figure()
    if res.points:
        fig.add_trace(go.Scatter(x=[p[0] for p in res.points], y=[p[1] for p in res.points],
                                 mode="lines+markers", name="subspace runs", text=[p[2] for p in res.points],
                                 marker=dict(size=9), hovertemplate="d=%{x}<br>%{y:.4f}<br>%{text}<extra></extra>"))
    if res.reference is not None:
        ref = res.reference
        fig.add_hline(y=ref["metric"], line_dash="dot", line_color="#6b7280",
                      annotation_text=f"{ref['label']} ({ref['method']}): {ref['metric']:.4f}",
                      annotation_position="top left")
    if res.threshold is not None:
        fig.add_hline(y=res.threshold, line_dash="dash", line_color="#ef4444",
                      annotation_text=f"{FRACTION:.0%} of the reference: {res.threshold:.4f}",
                      annotation_position="bottom right")
    if res.d90 is not None:
        y = next(m for d, m, _ in res.points if d == res.d90)
        fig.add_trace(go.Scatter(x=[res.d90], y=[y], mode="markers+text", name=f"d90 = {res.d90}",
                                 text=[f"d90 = {res.d90}"], textposition="top left",
                                 marker=dict(size=16, symbol="star", color="#ef4444")))
        fig.add_vline(x=res.d90, line_dash="dot", line_color="#ef4444")
    title = f"d90 = {res.d90}" if res.d90 is not None else "d90: not reached" if res.threshold else "d90"
    fig.update_layout(height=360, margin=dict(l=40, r=10, t=40, b=30), title=f"{res.metric} vs subspace "
                      f"dimension d — {title}", xaxis=dict(type="log", title="d (log)"), yaxis_title=res.metric,
                      template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def d90_for_ids(settings, ids: list[int]) -> D90:
    """compute_d90 over the runs `ids` read from the database (unknown ids skipped)."""
    from . import service

    return compute_d90(service.get_runs(settings, ids))
