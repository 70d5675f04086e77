"""GET /api/compare?run_ids=1,2,3: the Compare tab's table and Pareto frontiers over REST.

Answers `{"runs": [the comparison table's rows as {column: value}], "pareto": {"params":
[ids], "memory": [ids]}, "metric": name}`; the frontier is studio.compare.pareto_front over
the runs ranked by `metric` (fewer trainable parameters / less peak memory against a
better metric, its direction from engine.config.METRIC_DIRECTION). A malformed id list
is a 422 naming `run_ids`; a run that does not exist, or is someone else's, a 404."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends, HTTPException, Query

from workers.settings import Settings

from .. import compare, service

if TYPE_CHECKING:
    from . import ApiContext

MAX_RUNS = 50


def parse_ids(text: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3] (order kept, repeats dropped); ValueError naming what is wrong."""
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) < 2**31:
            raise ValueError(f"run_ids: {part!r} is not a run id (give positive integers separated by commas)")
        if int(part) not in ids:
            ids.append(int(part))
    if len(ids) > MAX_RUNS:
        raise ValueError(f"run_ids: at most {MAX_RUNS} runs at once (got {len(ids)})")
    return ids


def compare_body(settings: Settings, runs: list[dict]) -> dict:
    metrics = {r["id"]: service.get_metrics(settings, r["id"]) for r in runs}
    par = compare.pareto_of(runs)
    return {"runs": compare.table_records(compare.comparison_table(runs, metrics)),
            "pareto": par["front"], "metric": par["metric"]}


def routes(ctx: ApiContext) -> APIRouter:
    """GET /compare; runs the user may not see are a 404, as if they did not exist."""
    api, settings, user, owner_filter = APIRouter(), ctx.settings, ctx.user, ctx.owner_filter

    @api.get("/compare")
    def compare_runs(run_ids: str = Query(..., max_length=2000, description="run ids separated by commas"),
                     u: Optional[str] = Depends(user)) -> dict:
        try:
            ids = parse_ids(run_ids)
        except ValueError as e:
            raise HTTPException(422, str(e))
        owner = owner_filter(u)
        runs = []
        for rid in ids:
            try:
                run = service.get_run(settings, rid)
            except service.NotFound:
                raise HTTPException(404, f"run_ids: run {rid} not found")
            if owner is not None and run.get("owner") != owner:
                raise HTTPException(404, f"run_ids: run {rid} not found")
            runs.append(run)
        return compare_body(settings, runs)

    return api
