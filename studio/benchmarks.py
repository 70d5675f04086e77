"""Benchmarks in the studio: submit lm-evaluation-harness jobs for finished runs or a
base model (the worker runs them: workers.benchmarks), list the jobs, and build the
table of runs x tasks (the harness's metrics with their standard errors, the base
model first) that the Benchmarks tab and Compare show. Reads the database only."""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import select

from workers import db
from workers.benchmarks import (BenchmarkRequestError, check_fewshot, check_limit, check_task_names,
                                check_user_tasks, create_job, send)
from workers.settings import Settings

from . import service

MAX_RUNS = 50


def _seed_for(model: str, seed: Any) -> Optional[int]:
    """A random test model's seed (its weights are drawn from it); None for real models."""
    from engine.models import TINY_MODELS

    if model not in TINY_MODELS:
        return None
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise BenchmarkRequestError(f"seed: an integer 0..2^31-1, not {seed!r}")
    return seed


def check_base_model(settings: Settings, model: Any) -> str:
    """A base model name a worker can load as a causal LM: a bundled causal LM, a tiny
    test model, or a local directory under the model roots."""
    from engine.models import BUNDLED_MODELS, TINY_MODELS, ModelLoadError, resolve_model_dir

    if not isinstance(model, str) or not model.strip() or len(model) > 500 or "\x00" in model:
        raise BenchmarkRequestError("model: a base model name (a bundled model or a local directory)")
    if model in BUNDLED_MODELS or model in TINY_MODELS:
        return model
    try:
        resolve_model_dir(model, allowed_roots=settings.model_roots, cache_dir=settings.models_dir)
    except ModelLoadError as e:
        raise BenchmarkRequestError(str(e)) from None
    except (ValueError, OSError) as e:       # a name no file system can hold
        raise BenchmarkRequestError(f"model: {model[:80]!r} is not a model name or directory ({e})") from None
    return model


def _job_request(settings: Settings, body: dict) -> dict:
    unknown = set(body) - {"tasks", "user_tasks", "limit", "num_fewshot", "model", "seed"}
    if unknown:
        raise BenchmarkRequestError(f"{sorted(unknown)[0]}: unknown field")
    return {"tasks": check_task_names(body.get("tasks") or []),
            "user_tasks": check_user_tasks(body.get("user_tasks"), settings),
            "limit": check_limit(body.get("limit")), "num_fewshot": check_fewshot(body.get("num_fewshot"))}


def _queue(settings: Settings, **values) -> dict:
    with db.transaction(settings.database_url) as s:
        job = create_job(s, **values)
        jid, token = job.id, job.queue_token or 0
    send(settings, jid, token)
    return get_job(settings, jid)


def submit_for_run(settings: Settings, run: dict, body: dict, *, owner: Optional[str] = None) -> dict:
    """Queue a benchmark of finished run `run` (a dict from service.get_run, already
    checked visible to the caller). `body`: {"tasks", "user_tasks", "limit", "num_fewshot"}."""
    if not isinstance(body, dict):
        raise BenchmarkRequestError("body: a JSON object")
    if body.get("model") is not None or body.get("seed") is not None:
        raise BenchmarkRequestError("model: a run is evaluated on its own base model")
    if run["status"] != "succeeded" or not run.get("adapter"):
        raise BenchmarkRequestError(f"run_id: run {run['id']} is {run['status']}; only succeeded runs can be "
                                    f"evaluated")
    if run["task"] != "causal_lm":
        raise BenchmarkRequestError(f"run_id: run {run['id']} is a {run['task']} run; benchmarks score causal "
                                    f"language models")
    req = _job_request(settings, body)
    seed = (run.get("config") or {}).get("training", {}).get("seed")
    # the job belongs to the run's owner (an admin evaluating someone's run: they see its scores too)
    return _queue(settings, run_id=int(run["id"]), model=run["model"], seed=_seed_for(run["model"], seed),
                  owner=run.get("owner") or owner, **req)


def submit_for_base(settings: Settings, body: dict, *, owner: Optional[str] = None) -> dict:
    """Queue a benchmark of a base model alone: `body` adds {"model", "seed"} (seed: the
    random test models only)."""
    if not isinstance(body, dict):
        raise BenchmarkRequestError("body: a JSON object")
    model = check_base_model(settings, body.get("model"))
    req = _job_request(settings, body)
    return _queue(settings, run_id=None, model=model, seed=_seed_for(model, body.get("seed")), owner=owner, **req)


def job_to_dict(j: db.BenchmarkJob, results: Optional[list] = None) -> dict:
    out = {"id": j.id, "run_id": j.run_id, "model": j.model, "seed": j.seed, "status": j.status,
           "tasks": list(j.tasks or []) + [u["name"] for u in (j.user_tasks or [])], "limit": j.limit,
           "num_fewshot": j.num_fewshot, "error": j.error, "phase": j.phase, "worker": j.worker_host,
           "created_at": j.created_at.isoformat() if j.created_at else None,
           "finished_at": j.finished_at.isoformat() if j.finished_at else None}
    if results is not None:
        out["results"] = results
    return out


def result_to_dict(r: db.BenchmarkResult) -> dict:
    return {"task": r.task, "version": r.version, "n_samples": r.n_samples, "n_total": r.n_total,
            "limit": r.limit, "metrics": r.metrics}


def get_job(settings: Settings, job_id: int, *, owner: Optional[str] = None) -> dict:
    """A job with its results; NotFound unless it exists (and is `owner`'s, when given)."""
    with db.transaction(settings.database_url) as s:
        j = s.get(db.BenchmarkJob, job_id)
        if j is None or (owner is not None and j.owner != owner):
            raise service.NotFound(f"benchmark {job_id} not found")
        rows = s.scalars(select(db.BenchmarkResult).where(db.BenchmarkResult.job_id == job_id)
                         .order_by(db.BenchmarkResult.task)).all()
        return job_to_dict(j, [result_to_dict(r) for r in rows])


def list_jobs(settings: Settings, *, run_ids: Optional[list[int]] = None, owner: Optional[str] = None,
              limit: int = 200) -> list[dict]:
    """Jobs, newest first, with their results (those of `run_ids` and the base models of
    those runs, when given; `owner`'s only, when given)."""
    with db.transaction(settings.database_url) as s:
        q = select(db.BenchmarkJob).order_by(db.BenchmarkJob.id.desc()).limit(limit)
        if owner is not None:
            q = q.where(db.BenchmarkJob.owner == owner)
        if run_ids is not None:
            models = list(s.scalars(select(db.Run.model).where(db.Run.id.in_(run_ids))).all())
            q = q.where(db.BenchmarkJob.run_id.in_(run_ids)
                        | (db.BenchmarkJob.run_id.is_(None) & db.BenchmarkJob.model.in_(models or [""])))
        jobs = s.scalars(q).all()
        ids = [j.id for j in jobs]
        res: dict[int, list] = {i: [] for i in ids}
        if ids:
            for r in s.scalars(select(db.BenchmarkResult).where(db.BenchmarkResult.job_id.in_(ids))
                               .order_by(db.BenchmarkResult.task)):
                res[r.job_id].append(result_to_dict(r))
        return [job_to_dict(j, res[j.id]) for j in jobs]


def cancel_job(settings: Settings, job_id: int, *, owner: Optional[str] = None) -> str:
    from workers.benchmarks import cancel_job as cancel

    get_job(settings, job_id, owner=owner)
    with db.transaction(settings.database_url) as s:
        return cancel(s, job_id) or "missing"


# ---------------------------------------------------------------- the runs x tasks table

def fmt_score(m: Optional[dict]) -> str:
    if not m:
        return ""
    v, se = m.get("value"), m.get("stderr")
    if v is None:
        return ""
    return f"{v:.4f} ± {se:.4f}" if isinstance(se, (int, float)) else f"{v:.4f}"


def latest_scores(jobs: list[dict]) -> dict:
    """{(run_id or None, model, seed): {task: result}} from the newest succeeded job of each."""
    out: dict[tuple, dict] = {}
    for j in sorted(jobs, key=lambda j: j["id"]):
        if j["status"] != "succeeded":
            continue
        row = out.setdefault((j["run_id"], j["model"], j["seed"] if j["run_id"] is None else None), {})
        for r in j.get("results") or []:
            row[r["task"]] = r
    return out


def table(settings: Settings, run_ids: list[int], *, owner: Optional[str] = None) -> dict:
    """{"columns": [...], "rows": [[...]], "metrics": {task: metric}}: one row per run (the
    base model of the runs first, when it was evaluated), one column per task, each cell
    the task's main metric (its first) "value ± stderr"."""
    runs = service.get_runs(settings, run_ids[:MAX_RUNS]) if run_ids else []
    jobs = list_jobs(settings, run_ids=[r["id"] for r in runs], owner=owner) if runs else []
    scores = latest_scores(jobs)
    tasks: list[str] = sorted({t for row in scores.values() for t in row})
    main = {}
    for row in scores.values():
        for t, r in row.items():
            if t not in main and r["metrics"]:
                main[t] = next(iter(r["metrics"]))
    rows = []
    for key, row in scores.items():
        if key[0] is None:
            rows.append([f"base ({key[1]})", "base", *[fmt_score((row.get(t) or {}).get("metrics", {}).get(main.get(t)))
                                                       for t in tasks]])
    for r in runs:
        row = next((v for k, v in scores.items() if k[0] == r["id"]), {})
        rows.append([f"#{r['id']} {r['name']}", r["method"],
                     *[fmt_score((row.get(t) or {}).get("metrics", {}).get(main.get(t))) for t in tasks]])
    return {"columns": ["run", "method", *[f"{t} ({main.get(t, '')})" for t in tasks]], "rows": rows,
            "metrics": main}


def benchmark_metric(settings: Settings, run_ids: list[int], task: str, metric: str) -> dict[int, float]:
    """{run id: value} of `metric` on `task` from each run's newest succeeded benchmark
    (Compare ranks by it)."""
    out = {}
    for (rid, _m, _s), row in latest_scores(list_jobs(settings, run_ids=run_ids)).items():
        if rid is not None and task in row and metric in row[task]["metrics"]:
            out[rid] = row[task]["metrics"][metric]["value"]
    return out
