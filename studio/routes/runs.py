"""The run routes: submit, list, read, metrics, the adapter and merged downloads, and the
run's controls (cancel, resume, priority, delete). Every route that names a run looks it
up with the owner check (`ctx.load_run_for`), so someone else's run is a 404."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response

from .. import service

if TYPE_CHECKING:
    from . import ApiContext

ZIP = {200: {"content": {"application/zip": {}}}}


def routes(ctx: ApiContext) -> APIRouter:
    api, settings, user, load_run_for = APIRouter(), ctx.settings, ctx.user, ctx.load_run_for

    @api.post("/runs", status_code=201, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunConfig"}}}}})
    async def create_run(request: Request, u: Optional[str] = Depends(user)) -> dict:
        try:
            body = await request.json()
        except Exception:
            raise HTTPException(422, "body: not valid JSON")
        if not isinstance(body, dict):
            raise HTTPException(422, "body: the run config must be a JSON object")
        run_id = service.submit_run(settings, body, owner=u)
        return {"id": run_id}

    @api.get("/runs")
    def runs(status: Optional[Literal["queued", "running", "succeeded", "failed", "cancelled"]] = None,
             u: Optional[str] = Depends(user)) -> list[dict]:
        return service.list_runs(settings, owner=ctx.owner_filter(u), status=status)

    @api.get("/runs/{run_id}")
    def run(run_id: int, u: Optional[str] = Depends(user)) -> dict:
        return load_run_for(run_id, u)

    @api.get("/runs/{run_id}/metrics")
    def metrics(run_id: int, after_step: int = Query(0, ge=0, lt=2**63), u: Optional[str] = Depends(user)) -> list[dict]:
        load_run_for(run_id, u)
        # metrics.step is an INTEGER column (32-bit on PostgreSQL: a larger bound was a 500);
        # no step is larger, so the clamped bound answers the same
        return service.get_metrics(settings, run_id, min(after_step, 2**31 - 1))

    @api.get("/runs/{run_id}/adapter", response_class=Response, responses=ZIP)
    def adapter(run_id: int, u: Optional[str] = Depends(user)):
        """The adapter zip, streamed from this studio's verified copy of the store's object."""
        load_run_for(run_id, u)
        try:
            path, name = service.adapter_file(settings, run_id)
        except service.NotFound as e:
            raise HTTPException(404, str(e))
        return FileResponse(path, media_type="application/zip", filename=name)

    @api.get("/runs/{run_id}/merged", response_class=Response, responses=ZIP)
    def merged(run_id: int, u: Optional[str] = Depends(user)):
        """The run's adapter merged into the base weights (built on first request)."""
        from ..artifacts import ArtifactError, merged_zip_path

        load_run_for(run_id, u)
        try:
            path, name = merged_zip_path(settings, run_id)
        except service.NotFound as e:
            raise HTTPException(404, str(e))
        except ArtifactError as e:
            raise HTTPException(409, str(e))
        return FileResponse(path, media_type="application/zip", filename=name)

    @api.post("/runs/{run_id}/cancel")
    def cancel(run_id: int, u: Optional[str] = Depends(user)) -> dict:
        load_run_for(run_id, u)
        return {"id": run_id, "status": service.cancel_run(settings, run_id)}

    @api.post("/runs/{run_id}/resume")
    def resume(run_id: int, u: Optional[str] = Depends(user)) -> dict:
        load_run_for(run_id, u)
        return service.resume_run(settings, run_id)

    @api.post("/runs/{run_id}/priority")
    def priority(run_id: int, priority: int = Body(..., embed=True, ge=-5, le=5),
                 u: Optional[str] = Depends(user)) -> dict:
        load_run_for(run_id, u)
        return service.set_priority(settings, run_id, priority)

    @api.delete("/runs/{run_id}")
    def delete(run_id: int, u: Optional[str] = Depends(user)) -> dict:
        load_run_for(run_id, u)
        service.delete_run(settings, run_id)
        return {"id": run_id, "deleted": True}

    return api
