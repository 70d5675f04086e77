"""REST routes of benchmarks (lm-evaluation-harness jobs run by a worker; studio.benchmarks):

- `POST /api/runs/{id}/evaluate` `{"tasks": [...], "user_tasks": [YAML text, ...], "limit": N,
  "num_fewshot": k}` -> 202 and the queued job;
- `POST /api/benchmarks` the same plus `{"model": base model, "seed": s}` for a base model alone;
- `GET /api/benchmarks?run_ids=1,2` -> the jobs (with per-task results) of those runs and of
  their base models, newest first; `GET /api/benchmarks/table?run_ids=...` -> runs x tasks;
- `GET /api/benchmarks/{id}`; `POST /api/benchmarks/{id}/cancel` (a queued job).

Owner checks as for runs: a non-admin sees and evaluates only their own runs and jobs.
A bad field is 422 naming it; an unknown (or someone else's) run or job 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, Body, Depends, HTTPException, Query

from .. import benchmarks as bm
from .. import service

if TYPE_CHECKING:
    from . import ApiContext


def parse_ids(raw: Optional[str]) -> list[int]:
    if not raw:
        return []
    try:
        ids = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise HTTPException(422, "run_ids: comma-separated run ids") from None
    if len(ids) > bm.MAX_RUNS or any(not 0 < i < 2**31 for i in ids):
        raise HTTPException(422, f"run_ids: at most {bm.MAX_RUNS} run ids, each a positive integer")
    return ids


def routes(ctx: "ApiContext") -> APIRouter:
    r = APIRouter()
    settings = ctx.settings

    def refuse(e: Exception):
        raise HTTPException(422, str(e)) from None

    @r.post("/runs/{run_id}/evaluate", status_code=202)
    def evaluate_run(run_id: int, body: dict[str, Any] = Body(...), u: Optional[str] = Depends(ctx.user)) -> dict:
        """Queue a benchmark of a finished causal-LM run (its base with its adapter)."""
        run = ctx.load_run_for(run_id, u)
        try:
            return bm.submit_for_run(settings, run, body, owner=u)
        except bm.BenchmarkRequestError as e:
            refuse(e)

    @r.post("/benchmarks", status_code=202)
    def evaluate_base(body: dict[str, Any] = Body(...), u: Optional[str] = Depends(ctx.user)) -> dict:
        """Queue a benchmark of a base model alone."""
        try:
            return bm.submit_for_base(settings, body, owner=u)
        except bm.BenchmarkRequestError as e:
            refuse(e)

    @r.get("/benchmarks")
    def list_benchmarks(run_ids: Optional[str] = Query(None, description="comma-separated run ids"),
                        u: Optional[str] = Depends(ctx.user)) -> list[dict]:
        """Jobs with their per-task results (those of `run_ids` and their base models)."""
        ids = parse_ids(run_ids) if run_ids is not None else None
        if ids:
            ids = [ctx.load_run_for(i, u)["id"] for i in ids]
        return bm.list_jobs(settings, run_ids=ids, owner=ctx.owner_filter(u))

    @r.get("/benchmarks/table")
    def benchmark_table(run_ids: str = Query(..., description="comma-separated run ids"),
                        u: Optional[str] = Depends(ctx.user)) -> dict:
        """Runs x tasks: each task's main metric "value ± stderr", the base model first."""
        ids = [ctx.load_run_for(i, u)["id"] for i in parse_ids(run_ids)]
        return bm.table(settings, ids, owner=ctx.owner_filter(u))

    @r.get("/benchmarks/{job_id}")
    def get_benchmark(job_id: int, u: Optional[str] = Depends(ctx.user)) -> dict:
        if not 0 < job_id < 2**31:
            raise HTTPException(404, f"benchmark {job_id} not found")
        try:
            return bm.get_job(settings, job_id, owner=ctx.owner_filter(u))
        except service.NotFound as e:
            raise HTTPException(404, str(e)) from None

    @r.post("/benchmarks/{job_id}/cancel")
    def cancel_benchmark(job_id: int, u: Optional[str] = Depends(ctx.user)) -> dict:
        if not 0 < job_id < 2**31:
            raise HTTPException(404, f"benchmark {job_id} not found")
        try:
            return {"status": bm.cancel_job(settings, job_id, owner=ctx.owner_filter(u))}
        except service.NotFound as e:
            raise HTTPException(404, str(e)) from None

    return r
