"""Comparing runs: the side-by-side table, config differences, curves keyed by
step / tokens seen / epoch, CSV export, LoRA subspace similarity, the Pareto
frontier of metric against cost, and the generation metrics (BLEU, ROUGE-L,
exact match) and samples that causal-LM evaluations store. Pure functions over
the dicts `service` returns, so they are tested without a browser.

Pareto frontier: a run is on it when no other run is at most as costly (fewer
trainable parameters, or less peak memory) with a metric at least as good, and
strictly better on one of the two (Pareto dominance, as in multi-objective
optimisation; Deb, "Multi-Objective Optimization using Evolutionary Algorithms",
2001, Sec. 2.4). Runs with the same cost and metric do not dominate each other."""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from engine.config import GENERATION_METRICS, METRIC_DIRECTION
from engine.methods import METHODS
from engine.methods.base import Family

from .charts import is_number

GIB = 1024 ** 3
TABLE_COLUMNS = ["id", "name", "model", "method", "rank", "status", "trainable params", "trainable %",
                 "metric", "best metric", "final loss", "BLEU", "ROUGE-L", "exact match",
                 "est. peak GiB", "estimated for", "measured peak GiB",
                 "measured as",
                 "devices", "tokens/s", "tokens/s per device", "adapter KiB", "duration s", "owner"]
# what a run's measured peak is (engine.train's memory_kind)
MEMORY_KINDS = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "CPU peak RSS (process)"}
# each memory figure in the Compare chart by kind: an estimate is made for a CUDA device (at submit)
# or for the kind of device of the worker that claimed the run (engine.estimator.runs)
ESTIMATE_LABELS = {"cuda": "estimated CUDA", "cpu": "estimated CPU"}
MEASURED_LABELS = {"cuda_max_allocated": "measured CUDA", "cpu_peak_rss": "measured CPU RSS"}
X_AXES = {"step": "step", "tokens seen": "tokens", "epoch": "epoch"}


def run_label(run: dict) -> str:
    return f"#{run['id']} {run['name']}"


def _r(v, nd):
    return None if v is None else round(float(v), nd)


def world_size_of(run: dict) -> int:
    """The number of processes a run trains on (training.distributed.world_size; 1 when absent)."""
    d = ((run.get("config") or {}).get("training") or {}).get("distributed") or {}
    return int(d.get("world_size") or 1)


def memory_kind_label(kind: Optional[str]) -> Optional[str]:
    """How a measured peak was taken, in words (None when the run recorded no kind)."""
    return MEMORY_KINDS.get(kind, kind) if kind else None


def measured_kinds_label(runs: list[dict]) -> str:
    """The kind of every measured peak among `runs` when they agree, 'mixed: see the table' when they do not."""
    kinds = {memory_kind_label(r.get("memory_kind")) for r in runs if r.get("measured_peak_bytes")} - {None}
    return "" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed: see the table"


def estimate_of(run: dict) -> tuple[Optional[int], Optional[str]]:
    """(bytes, device kind) of a run's stored estimate: the claiming worker's
    re-estimate (`estimate.device`), else the submit-time one, which is for CUDA."""
    est = run.get("estimate") or {}
    total = (est.get("rows") or {}).get("total") or run.get("estimated_peak_bytes")
    if not total:
        return None, None
    return int(total), est.get("device") or "cuda"


def memory_figures(run: dict) -> dict:
    """A run's estimated and measured peak, each with the words of its kind
    ('estimated CPU', 'measured CPU RSS', ...); None where the run has no figure."""
    est, kind = estimate_of(run)
    measured = run.get("measured_peak_bytes") or None
    mkind = run.get("memory_kind")
    return {"estimated": est, "estimated_kind": ESTIMATE_LABELS.get(kind, f"estimated {kind}") if est else None,
            "measured": measured,
            "measured_kind": (MEASURED_LABELS.get(mkind, f"measured {mkind}") if mkind else "measured")
            if measured else None}


def comparison_row(run: dict, metrics: Optional[list[dict]] = None) -> list:
    """One row of the side-by-side table; `metrics` (the run's metric rows) give the last
    generation metrics (empty when not given)."""
    gen = last_generation_metrics(metrics or [])
    tr_pct = 100 * run["n_trainable"] / run["n_params"] if run.get("n_params") and run.get("n_trainable") else None
    size = (run.get("adapter") or {}).get("size")
    world, tps = world_size_of(run), run.get("tokens_per_s")
    return [run["id"], run["name"], run["model"], run["method"], run.get("rank"), run["status"],
            run.get("n_trainable"), _r(tr_pct, 4), run.get("metric_name"), _r(run.get("best_metric"), 4),
            _r(run.get("final_loss"), 4), _r(gen.get("bleu"), 2), _r(gen.get("rouge_l"), 4),
            _r(gen.get("exact_match"), 4),
            _r(estimate_of(run)[0] / GIB, 4) if estimate_of(run)[0] else None, memory_figures(run)["estimated_kind"],
            _r(run["measured_peak_bytes"] / GIB, 4) if run.get("measured_peak_bytes") else None,
            memory_kind_label(run.get("memory_kind")) if run.get("measured_peak_bytes") else None,
            world, _r(tps, 1), None if tps is None else _r(tps / world, 1),
            _r(size / 1024, 1) if size else None, _r(run.get("duration_s"), 1), run.get("owner")]


def comparison_table(runs: list[dict], metrics: Optional[dict] = None) -> list[list]:
    """Rows of `runs`; `metrics` maps a run id to its metric rows (for the generation columns)."""
    return [comparison_row(r, (metrics or {}).get(r["id"])) for r in runs]


def table_records(rows: list[list]) -> list[dict]:
    """The table's rows as {column: value} (the REST view of the same table)."""
    return [dict(zip(TABLE_COLUMNS, row)) for row in rows]


def to_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'method': {'r': 8}} -> {'method.r': 8}; lists stay values."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_table(runs: list[dict], differences_only: bool = False) -> tuple[list[str], list[list]]:
    """Rows: config keys; columns: one per run. With differences_only, keys
    whose value is the same in every run are left out."""
    flats = [flatten(r.get("config") or {}) for r in runs]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    rows = []
    for k in keys:
        vals = [f.get(k) for f in flats]
        if differences_only and all(v == vals[0] for v in vals):
            continue
        rows.append([k] + ["–" if v is None else (", ".join(map(str, v)) if isinstance(v, list) else str(v))
                           for v in vals])
    return ["key"] + [run_label(r) for r in runs], rows


def with_x(metrics: list[dict], x: str) -> list[dict]:
    """Metric rows with an `x` value: step, tokens seen (throughput × elapsed) or epoch."""
    out = []
    for m in metrics:
        if x == "tokens":
            if m.get("tokens_per_s") is None or m.get("elapsed_s") is None:
                continue
            xv: Optional[float] = m["tokens_per_s"] * m["elapsed_s"]
        else:
            xv = m.get(x)
        if xv is None:
            continue
        out.append({**m, "x": xv})
    return out


def metric_name_of(runs: list[dict]) -> str:
    names = [r.get("metric_name") for r in runs if r.get("metric_name")]
    if names:
        return max(set(names), key=names.count)
    return "accuracy" if runs and runs[0].get("task") == "classification" else "eval_loss"


def parse_run_ids(selection: list) -> list[int]:
    """Dropdown values like '#12 name' (or ints) -> [12, ...], order kept, no duplicates."""
    ids: list[int] = []
    for s in selection or []:
        try:
            rid = int(s) if isinstance(s, (int, float)) else int(str(s).lstrip("#").split()[0])
        except (ValueError, IndexError):
            continue
        if rid not in ids:
            ids.append(rid)
    return ids


def is_lora_run(run: dict) -> bool:
    """A finished run of the LoRA family (LoRA, DoRA, AdaLoRA, QLoRA, ...): its adapter
    holds the low-rank `A` matrices that the subspace similarity reads."""
    spec = METHODS.get(run.get("method") or "")
    return spec is not None and spec.family == Family.LORA and run.get("status") == "succeeded"


def subspace_similarity(settings, run_a: int, run_b: int) -> dict[str, list[list[float]]]:
    """φ(i, j) per shared LoRA module between two runs' adapters (engine.analysis)."""
    from engine.adapters import extract_zip_safely
    from engine.analysis import adapter_subspace_similarity

    from . import service

    tmp = Path(tempfile.mkdtemp(prefix="subspace-"))
    try:
        dirs = []
        for i, rid in enumerate((run_a, run_b)):
            path, _ = service.adapter_file(settings, rid)      # a verified local file, not bytes in memory
            dirs.append(extract_zip_safely(path, tmp / str(i)))
        return adapter_subspace_similarity(dirs[0], dirs[1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ generation metrics and samples

def numeric_eval(ev: Optional[dict]) -> dict[str, float]:
    """The numbers of an evaluation's dict (its `samples` lists and anything else left out)."""
    return {k: v for k, v in (ev or {}).items() if is_number(v)}


def gen_value(ev: Optional[dict], name: str) -> Optional[float]:
    """Generation metric `name` of one evaluation: the run's own figure, else (a multi-task
    run that reports only `eval/<task>/<name>`) the unweighted mean over its tasks."""
    ev = ev or {}
    if is_number(ev.get(name)):
        return float(ev[name])
    per_task = [v for k, v in ev.items() if k.startswith("eval/") and k.endswith(f"/{name}") and is_number(v)]
    return sum(per_task) / len(per_task) if per_task else None


def last_generation_metrics(metrics: list[dict]) -> dict[str, float]:
    """{bleu, rouge_l, exact_match: the latest evaluation's value} for the metrics the run has."""
    out: dict[str, float] = {}
    for m in metrics:
        for name in GENERATION_METRICS:
            v = gen_value(m.get("eval"), name)
            if v is not None:
                out[name] = v
    return out


def has_generation_metrics(metrics: list[dict]) -> bool:
    return bool(last_generation_metrics(metrics))


def _samples_in(ev: dict) -> list[tuple[str, dict]]:
    """(task, sample) pairs of one evaluation: `samples`, then `eval/<task>/samples`."""
    out = [("", s) for s in ev.get("samples") or [] if isinstance(s, dict)]
    for k, v in ev.items():
        if k.startswith("eval/") and k.endswith("/samples") and k.count("/") >= 2 and isinstance(v, list):
            out += [(k[len("eval/"):-len("/samples")], s) for s in v if isinstance(s, dict)]
    return out


def sample_steps(metrics: list[dict]) -> list[int]:
    """Steps whose evaluation stored generation samples, latest first."""
    return [m["step"] for m in reversed(metrics) if m.get("eval") and _samples_in(m["eval"])]


SAMPLE_COLUMNS = ["task", "prompt", "reference", "output"]


def samples_table(metrics: list[dict], step: Optional[int] = None) -> tuple[Optional[int], list[list]]:
    """(step, rows of [task, prompt, reference, output]) of the evaluation at `step`, or of the
    latest one with samples when `step` is None or has none; (None, []) when no evaluation has any."""
    steps = sample_steps(metrics)
    if not steps:
        return None, []
    chosen = step if step in steps else steps[0]
    ev = next(m["eval"] for m in metrics if m["step"] == chosen and m.get("eval") and _samples_in(m["eval"]))
    return chosen, [[task or "–", str(s.get("prompt", "")), str(s.get("reference", "")), str(s.get("output", ""))]
                    for task, s in _samples_in(ev)]


# ------------------------------------------------------------------ the Pareto frontier

def higher_is_better(metric: str) -> bool:
    """The direction of a metric (engine.config.METRIC_DIRECTION); unknown names: higher."""
    return METRIC_DIRECTION.get(metric, True)


def pareto_front(points: list[dict], higher_better: bool) -> list:
    """Ids of the points ({id, x: cost, y: metric}) no other point dominates, cheapest
    first. q dominates p when q.x <= p.x and q.y is at least as good, one of them strictly;
    equal points both stay. Points missing x or y (or not finite) take no part."""
    pts = [p for p in points if is_number(p.get("x")) and is_number(p.get("y"))]

    def better(a, b):        # a's metric strictly better than b's
        return a > b if higher_better else a < b

    def dominates(q, p):
        return (q["x"] <= p["x"] and not better(p["y"], q["y"])
                and (q["x"] < p["x"] or better(q["y"], p["y"])))

    front = [p for p in pts if not any(dominates(q, p) for q in pts if q is not p)]
    front.sort(key=lambda p: (p["x"], -p["y"] if higher_better else p["y"]))
    return [p["id"] for p in front]


def memory_point(run: dict) -> tuple[Optional[float], Optional[str]]:
    """(GiB, which) of a run for the memory chart: its measured peak where recorded, else
    its estimate; `which` in words ('measured CPU RSS', 'estimated CUDA')."""
    f = memory_figures(run)
    if f["measured"]:
        return f["measured"] / GIB, f["measured_kind"]
    if f["estimated"]:
        return f["estimated"] / GIB, f["estimated_kind"]
    return None, None


def pareto_points(runs: list[dict]) -> dict[str, list[dict]]:
    """The points of both charts: 'params' (x: trainable parameters) and 'memory' (x: peak
    GiB, `note` naming measured or estimated); y is each run's best metric."""
    params, memory = [], []
    for r in runs:
        base = {"id": r["id"], "label": run_label(r), "method": r.get("method") or "?", "y": r.get("best_metric")}
        params.append({**base, "x": r.get("n_trainable"), "note": ""})
        gib, which = memory_point(r)
        memory.append({**base, "x": gib, "note": f"GiB {which}" if which else ""})
    return {"params": params, "memory": memory}


def pareto_of(runs: list[dict], metric: Optional[str] = None) -> dict:
    """{'metric', 'points': {params, memory}, 'front': {params: [ids], memory: [ids]}} over `runs`
    that report `metric` (the runs' metric_name by default); others take no part."""
    metric = metric or metric_name_of(runs)
    ranked = [r for r in runs if (r.get("metric_name") or metric) == metric]
    pts = pareto_points(ranked)
    hb = higher_is_better(metric)
    return {"metric": metric, "points": pts, "front": {k: pareto_front(v, hb) for k, v in pts.items()}}


def _cost(x: float, note: str) -> str:
    return f"{x:.3f}" if note.startswith("GiB") else f"{int(x):,}" if float(x).is_integer() else f"{x:,.4g}"


def front_markdown(points: list[dict], front: list, metric: str, cost: str) -> str:
    """The frontier runs as a markdown table (cheapest first), or a line saying there are none."""
    by_id = {p["id"]: p for p in points}
    rows = [by_id[i] for i in front if i in by_id]
    if not rows:
        return f"**Pareto frontier ({cost}):** no run has both a {metric} and a {cost} figure."
    body = "\n".join(f"| {p['label']} | {p['method']} | {_cost(p['x'], p.get('note') or '')} {p.get('note') or ''}"
                      f" | {p['y']:.4f} |" for p in rows)
    arrow = "higher" if higher_is_better(metric) else "lower"
    return (f"**Pareto frontier ({cost}; {metric}, {arrow} is better):** no other run beats these on both.\n\n"
            f"| run | method | {cost} | {metric} |\n|---|---|---|---|\n{body}")


# ---------------------------------------------------------------- ranking by a benchmark metric

def benchmark_choices(jobs: list[dict]) -> list[str]:
    """'task / metric' labels of the benchmark metrics that the runs' succeeded jobs report."""
    seen: dict[str, None] = {}
    for j in jobs:
        if j["status"] == "succeeded" and j["run_id"] is not None:
            for r in j.get("results") or []:
                for m in r["metrics"]:
                    seen.setdefault(f"{r['task']} / {m}", None)
    return sorted(seen)


def rank_by_benchmark(runs: list[dict], scores: dict, choice: str) -> list[list]:
    """[rank, run, method, value ± stderr] of `runs` by the metric `choice` ('task / metric')
    of their newest succeeded benchmark (studio.benchmarks.latest_scores's `scores`), best
    first by the harness's own higher_is_better; runs without that score are left out."""
    if not choice or " / " not in choice:
        return []
    task, metric = choice.split(" / ", 1)
    found = []
    for r in runs:
        row = next((v for k, v in scores.items() if k[0] == r["id"]), {})
        m = ((row.get(task) or {}).get("metrics") or {}).get(metric)
        if m and m.get("value") is not None:
            found.append((r, m))
    higher = next((m.get("higher_is_better") for _, m in found if m.get("higher_is_better") is not None), True)
    found.sort(key=lambda p: -p[1]["value"] if higher else p[1]["value"])
    out = []
    for i, (r, m) in enumerate(found, 1):
        se = m.get("stderr")
        out.append([i, run_label(r), r["method"], f"{m['value']:.4f}" + (f" ± {se:.4f}" if se is not None else "")])
    return out
