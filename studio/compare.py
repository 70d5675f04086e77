"""Comparing runs: the side-by-side table, config differences, curves keyed by
step / tokens seen / epoch, CSV export and LoRA subspace similarity. Pure
functions over the dicts `service` returns, so they are tested without a browser."""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from engine.methods import METHODS
from engine.methods.base import Family

GIB = 1024 ** 3
TABLE_COLUMNS = ["id", "name", "model", "method", "rank", "status", "trainable params", "trainable %",
                 "metric", "best metric", "final loss", "est. peak GiB", "estimated for", "measured peak GiB",
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


def comparison_row(run: dict) -> list:
    tr_pct = 100 * run["n_trainable"] / run["n_params"] if run.get("n_params") and run.get("n_trainable") else None
    size = (run.get("adapter") or {}).get("size")
    world, tps = world_size_of(run), run.get("tokens_per_s")
    return [run["id"], run["name"], run["model"], run["method"], run.get("rank"), run["status"],
            run.get("n_trainable"), _r(tr_pct, 4), run.get("metric_name"), _r(run.get("best_metric"), 4),
            _r(run.get("final_loss"), 4),
            _r(estimate_of(run)[0] / GIB, 4) if estimate_of(run)[0] else None, memory_figures(run)["estimated_kind"],
            _r(run["measured_peak_bytes"] / GIB, 4) if run.get("measured_peak_bytes") else None,
            memory_kind_label(run.get("memory_kind")) if run.get("measured_peak_bytes") else None,
            world, _r(tps, 1), None if tps is None else _r(tps / world, 1),
            _r(size / 1024, 1) if size else None, _r(run.get("duration_s"), 1), run.get("owner")]


def comparison_table(runs: list[dict]) -> list[list]:
    return [comparison_row(r) for r in runs]


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
