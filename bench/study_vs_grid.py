"""A study against a fixed grid of the same size (issue #28's proof): MiniLM on
demo-sentiment, for each method the study's best run (TPE on the learning rate, the
method's measured default first, successive-halving pruning) against the best of a grid
of as many runs at fixed learning rates, log-evenly spread over the same range (the
centres of equal cells of [default / 10, default x 10] on a log scale); and whether the
study's order of methods keeps the held-out one (full >= LoRA >= IA3 >= BitFit >= prompt
tuning, restricted to the methods studied). Every run, study trial or grid point, is an
ordinary run: submitted with studio.service.submit_run and trained by the worker's own
execute_run in this process (one torch thread: a loaded 2-core machine crawls with more).

    python bench/study_vs_grid.py                       # lora, ia3, bitfit, prompt_tuning; 8 + 8 runs each
    python bench/study_vs_grid.py --methods lora,bitfit --per-method 3 --steps 20 --no-write

Writes bench/RESULTS-study.md (stamped; see bench/stamp.py)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HELD_OUT_ORDER = ["full", "lora", "ia3", "bitfit", "prompt_tuning"]


def grid_lrs(lo: float, hi: float, n: int) -> list[float]:
    """`n` rates at the centres of `n` equal cells of [lo, hi] on a log scale."""
    return [lo * (hi / lo) ** ((i + 0.5) / n) for i in range(n)]


def base_config(steps: int, batch: int, seq: int, eval_every: int, eval_rows: int, seed: int = 0) -> dict:
    return {"model": "minilm", "task": "classification", "dataset": {"name": "demo-sentiment"},
            "training": {"max_steps": steps, "batch_size": batch, "max_seq_len": seq, "eval_every": eval_every,
                         "eval_max_rows": eval_rows, "seed": seed}}


def drain(settings) -> None:
    """Train every queued run, oldest first, as a worker would."""
    from studio import service
    from workers.tasks import execute_run

    while queued := sorted(r["id"] for r in service.list_runs(settings, status="queued")):
        for rid in queued:
            execute_run(rid, settings)


def run_study(settings, methods: list[str], per_method: int, base: dict, seed: int = 0) -> dict:
    """Drive a study to its end (advance, train what it queued, again). Returns get_study's answer."""
    from studio import studies
    from studio.study_driver import advance

    body = {"name": "study-vs-grid", "methods": methods, "budget": {"trials": per_method * len(methods)},
            "metric": "accuracy", "parallel": 1, "seed": seed, "base": base}
    sid = studies.create_study(settings, body)
    for _ in range(per_method * len(methods) * 3 + 5):
        advance(settings, sid)
        st = studies.get_study(settings, sid)
        if st["status"] != "running":
            return st
        drain(settings)
    raise RuntimeError(f"study {sid} did not finish: {studies.get_study(settings, sid)['status']}")


def run_grid(settings, methods: list[str], per_method: int, base: dict) -> dict[str, list[tuple[float, float]]]:
    """{method: [(lr, best accuracy), ...]} over the fixed grid of `per_method` rates."""
    import copy

    from studio import service
    from studio.study_space import lr_range, parse_study
    from workers.tasks import execute_run

    spec = parse_study({"methods": methods, "budget": {"trials": len(methods)}, "base": base})
    out: dict[str, list[tuple[float, float]]] = {}
    for m in methods:
        out[m] = []
        for lr in grid_lrs(*lr_range(spec, m), per_method):
            cfg = copy.deepcopy(base)
            cfg.update(name=f"grid-{m}-{lr:.2e}", method={"name": m}, metric="accuracy")
            cfg["training"]["learning_rate"] = lr
            rid = service.submit_run(settings, cfg)
            execute_run(rid, settings)
            run = service.get_run(settings, rid)
            out[m].append((lr, run["best_metric"] if run["best_metric"] is not None else float("nan")))
    return out


def compare(settings, methods: list[str], per_method: int, base: dict, seed: int = 0) -> dict:
    """The study and the grid on the same methods; {"study": get_study answer, "grid": ...,
    "study_best": {m: value}, "grid_best": {m: value}, "order_kept": bool, "order": [...]}"""
    st = run_study(settings, methods, per_method, base, seed)
    grid = run_grid(settings, methods, per_method, base)
    study_best = {m: (st["best"].get(m) or {}).get("value") for m in methods}
    grid_best = {m: max((v for _, v in grid[m] if not math.isnan(v)), default=None) for m in methods}
    order = [m for m in HELD_OUT_ORDER if m in methods]
    kept = all(study_best[a] is not None and study_best[b] is not None and study_best[a] >= study_best[b]
               for a, b in zip(order, order[1:]))
    return {"study": st, "grid": grid, "study_best": study_best, "grid_best": grid_best, "order": order,
            "order_kept": kept}


def fresh_settings():
    """Settings of a new data dir (SQLite, file store) under a temporary directory."""
    tmp = Path(tempfile.mkdtemp(prefix="study-vs-grid-"))
    os.environ["STUDIO_DATA_DIR"] = str(tmp / "data")
    os.environ["STUDIO_ARTIFACT_URL"] = (tmp / "store").as_uri()
    for var in ("STUDIO_DATABASE_URL", "STUDIO_BROKER_URL"):
        os.environ.pop(var, None)
    from studio.runtime import prepare_database
    from workers.settings import load_settings

    s = load_settings()
    prepare_database(s)
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="lora,ia3,bitfit,prompt_tuning")
    p.add_argument("--per-method", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-rows", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from stamp import Stamp

    stamp = Stamp("bench/study_vs_grid.py")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    base = base_config(a.steps, a.batch, a.seq, a.eval_every, a.eval_rows, a.seed)
    res = compare(fresh_settings(), methods, a.per_method, base, a.seed)
    stamp.say(f"MiniLM on demo-sentiment; {len(methods)} methods x {a.per_method} study trials against "
              f"{a.per_method} grid runs each; {a.steps} steps, batch {a.batch}, max_seq_len {a.seq}, evaluation "
              f"every {a.eval_every} steps on {a.eval_rows} validation rows; accuracy; "
              f"{torch.get_num_threads()} torch thread(s); seed {a.seed}.")
    stamp.say("")
    stamp.say("| method | study best | grid best | study >= grid | study trials (lr: accuracy, state) | "
              "grid (lr: accuracy) |")
    stamp.say("|---|---|---|---|---|---|")
    for m in methods:
        trials = [t for t in res["study"]["trials"] if t["method"] == m]
        tt = "; ".join(f"{t['params']['learning_rate']:.2e}: {t['value']:.3f} {t['state']}" if t["value"] is not None
                       else f"{t['params']['learning_rate']:.2e}: - {t['state']}" for t in trials)
        gg = "; ".join(f"{lr:.2e}: {v:.3f}" for lr, v in res["grid"][m])
        sb, gb = res["study_best"][m], res["grid_best"][m]
        ok = sb is not None and gb is not None and sb >= gb
        stamp.say(f"| {m} | {sb if sb is None else f'{sb:.3f}'} | {gb if gb is None else f'{gb:.3f}'} | "
                  f"{'yes' if ok else 'NO'} | {tt} | {gg} |")
    stamp.say("")
    bests = ", ".join(f"{m} {res['study_best'][m]}" for m in res["order"])
    kept = "kept" if res["order_kept"] else "NOT kept"
    stamp.say(f"Held-out order {' >= '.join(res['order'])}: {kept} by the study's best runs ({bests}).")
    if not a.no_write:
        stamp.write("study", title="A study against a fixed learning-rate grid of the same size (#28)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
