"""The study view's plotly figures: each method's metric against learning rate, the
pruning history (every trial's evaluation curve, pruned ones cut short), the
parameter importances (Optuna's PED-ANOVA evaluator, which needs no extra package), and
the Pareto frontiers of each method's best run against trainable parameters and peak
memory (studio.charts.pareto_chart, studio.compare.pareto_front)."""

from __future__ import annotations

import logging
from typing import Optional

import plotly.graph_objects as go

from .charts import GIB, PALETTE, empty, is_number, pareto_chart
from .compare import pareto_front

log = logging.getLogger("peft_studio.studies")


def _colors(study: dict) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(study["methods"])}


def lr_curve(study: dict) -> go.Figure:
    """Metric vs learning rate (log x), one colour per method: completed trials filled,
    pruned trials hollow at the last value they reached, each method's best ringed."""
    trials = [t for t in study["trials"] if t["state"] in ("completed", "pruned") and is_number(t["value"])]
    if not trials:
        return empty("metric vs learning rate", "no finished trial yet")
    fig = go.Figure()
    colors = _colors(study)
    for m in study["methods"]:
        for state, symbol in (("completed", "circle"), ("pruned", "circle-open")):
            pts = sorted((t for t in trials if t["method"] == m and t["state"] == state),
                         key=lambda t: t["params"]["learning_rate"])
            if not pts:
                continue
            fig.add_trace(go.Scatter(
                x=[t["params"]["learning_rate"] for t in pts], y=[t["value"] for t in pts],
                mode="markers+lines" if state == "completed" else "markers", name=f"{m} ({state})",
                line=dict(color=colors[m], width=1, dash="dot"), marker=dict(size=10, symbol=symbol, color=colors[m]),
                customdata=[[t["number"], t["run_id"]] for t in pts],
                hovertemplate=f"{m} trial %{{customdata[0]}} (run %{{customdata[1]}})<br>lr %{{x:.2e}}<br>"
                              f"{study['metric']} %{{y:.4f}}<extra>{state}</extra>"))
        b = study["best"].get(m)
        if b:
            fig.add_trace(go.Scatter(x=[b["params"]["learning_rate"]], y=[b["value"]], mode="markers",
                                     name=f"{m} best", showlegend=False, hoverinfo="skip",
                                     marker=dict(size=18, symbol="circle-open", color="#111827", line=dict(width=2))))
    fig.update_layout(height=360, title=f"{study['metric']} vs learning rate", template="plotly_white",
                      xaxis=dict(type="log", title="learning rate (log)"), yaxis_title=study["metric"],
                      margin=dict(l=40, r=10, t=40, b=30), legend=dict(orientation="h", y=-0.2))
    return fig


def pruning_history(study: dict) -> go.Figure:
    """Every trial's evaluations of the metric against training step; a pruned trial's
    curve ends with an x where the pruner stopped it."""
    trials = [t for t in study["trials"] if t["curve"]]
    if not trials:
        return empty("pruning history", "no evaluation reported yet")
    fig = go.Figure()
    colors = _colors(study)
    shown: set[str] = set()
    for t in trials:
        xs, ys = [p[0] for p in t["curve"]], [p[1] for p in t["curve"]]
        pruned = t["state"] == "pruned"
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=t["method"], legendgroup=t["method"],
            showlegend=t["method"] not in shown, opacity=0.55 if pruned else 0.95,
            line=dict(color=colors.get(t["method"], "#6b7280"), dash="dot" if pruned else "solid"),
            marker=dict(size=[6] * (len(xs) - 1) + [12 if pruned else 6],
                        symbol=["circle"] * (len(xs) - 1) + ["x" if pruned else "circle"]),
            hovertemplate=f"{t['method']} trial {t['number']} ({t['state']})<br>step %{{x}}<br>"
                          f"{study['metric']} %{{y:.4f}}<extra></extra>"))
        shown.add(t["method"])
    n_pruned = sum(1 for t in study["trials"] if t["state"] == "pruned")
    fig.update_layout(height=360, title=f"pruning history ({n_pruned} pruned, {study['pruner'].replace('_', ' ')})",
                      template="plotly_white", xaxis_title="step", yaxis_title=study["metric"],
                      margin=dict(l=40, r=10, t=40, b=30), legend=dict(orientation="h", y=-0.2))
    return fig


def importances(settings, study: dict) -> dict[str, dict[str, float]]:
    """{method: {parameter: importance}} from Optuna's PED-ANOVA evaluator over each
    method's completed trials; a method with too few trials (or one parameter) is left out."""
    import optuna

    from .study_driver import optuna_study
    from .study_space import arms

    out: dict[str, dict[str, float]] = {}
    for i, arm in enumerate(arms(study["spec"])):
        done = [t for t in study["trials"] if t["method"] == arm.label and t["state"] == "completed"]
        if len(done) < 3:
            continue
        try:
            st = optuna_study(settings, study["id"], study["spec"], arm, i, 0)
            ev = optuna.importance.PedAnovaImportanceEvaluator()
            out[arm.label] = {k: float(v) for k, v in optuna.importance.get_param_importances(st, evaluator=ev).items()}
        except Exception as e:   # too few distinct values, a single parameter...
            log.info("study %s: no importances for %s: %s", study["id"], arm.label, e)
    return out


def importance_chart(imp: dict[str, dict[str, float]]) -> go.Figure:
    if not imp:
        return empty("parameter importance", "needs three completed trials of a method")
    fig = go.Figure()
    for i, (m, vals) in enumerate(imp.items()):
        fig.add_trace(go.Bar(name=m, x=list(vals), y=list(vals.values()), marker_color=PALETTE[i % len(PALETTE)],
                             hovertemplate=f"{m}: %{{x}} %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="group", height=340, title="parameter importance (PED-ANOVA, per method)",
                      template="plotly_white", yaxis_title="importance", margin=dict(l=40, r=10, t=40, b=30),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def best_points(study: dict) -> dict[str, list[dict]]:
    """Each method's best run as a point against trainable parameters and peak memory."""
    pts: dict[str, list[dict]] = {"params": [], "memory": []}
    for m, b in study["best"].items():
        base = {"id": b["run_id"], "label": f"#{b['run_id']}", "method": m, "y": b["value"]}
        pts["params"].append({**base, "x": b.get("n_trainable"), "note": "trainable parameters"})
        mem = b.get("peak_memory_bytes")
        pts["memory"].append({**base, "x": mem / GIB if mem else None, "note": "GiB"})
    return pts


def pareto_charts(study: dict) -> tuple[go.Figure, go.Figure, dict[str, list]]:
    """(metric vs trainable parameters, metric vs peak memory, the frontiers' run ids)."""
    higher = study["direction"] == "maximize"
    pts = best_points(study)
    front = {k: pareto_front(v, higher) for k, v in pts.items()}
    return (pareto_chart(pts["params"], study["metric"], front["params"], title="best runs: metric vs trainable "
                         "parameters", x_title="trainable parameters (log)", log_x=True),
            pareto_chart(pts["memory"], study["metric"], front["memory"], title="best runs: metric vs peak memory",
                         x_title="peak GiB"), front)


def best_table(study: dict) -> list[list]:
    rows = []
    for m in study["methods"]:
        b = study["best"].get(m)
        n = [t for t in study["trials"] if t["method"] == m]
        counts = {s: sum(1 for t in n if t["state"] == s) for s in ("completed", "pruned", "not_launched", "failed")}
        rows.append([m, b["run_id"] if b else None, round(b["value"], 4) if b else None,
                     f"{b['params']['learning_rate']:.2e}" if b else None,
                     ", ".join(f"{k}={v}" for k, v in (b["params"] if b else {}).items() if k != "learning_rate"),
                     len(n), counts["completed"], counts["pruned"], counts["not_launched"] + counts["failed"]])
    return rows


BEST_COLUMNS = ["method", "best run", "value", "learning rate", "other parameters", "trials", "completed",
                "pruned", "not launched / failed"]


def trials_table(study: dict) -> list[list]:
    return [[t["method"], t["number"], t["run_id"], t["state"],
             round(t["value"], 4) if is_number(t["value"]) else None,
             ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()),
             (t["reason"] or "")[:300]] for t in study["trials"]]


TRIAL_COLUMNS = ["method", "trial", "run", "state", "value", "parameters", "reason"]


def best_value(study: dict, method: str) -> Optional[float]:
    b = study["best"].get(method)
    return b["value"] if b else None
