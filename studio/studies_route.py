"""REST for studies (the contract in shared/DESIGN.md): POST /studies (the study request)
-> {"id"}; GET /studies; GET /studies/{id} -> {status, trials, best, ...}; POST
/studies/{id}/cancel. A bad request is a 422 naming the field; someone else's study a 404."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Body, Depends, HTTPException

from . import service, studies
from .study_space import StudyError
from .study_storage import StudyStorageError


def routes(ctx) -> APIRouter:
    """`ctx` carries settings, the login dependency `user` and `owner_filter`."""
    r = APIRouter()
    settings = ctx.settings

    def study_for(study_id: int, u: Optional[str]) -> dict:
        try:
            return studies.get_study(settings, study_id, owner=ctx.owner_filter(u))
        except service.NotFound as e:
            raise HTTPException(404, str(e))

    @r.post("/studies", status_code=201)
    def create_study(body: Any = Body(..., description="the study: {name, base, methods, budget, metric, search}"),
                     u: Optional[str] = Depends(ctx.user)) -> dict:
        try:
            return {"id": studies.create_study(settings, body, owner=u)}
        except StudyError as e:
            raise HTTPException(422, str(e))
        except StudyStorageError as e:
            raise HTTPException(503, str(e))

    @r.get("/studies")
    def list_studies(u: Optional[str] = Depends(ctx.user)) -> list[dict]:
        return studies.list_studies(settings, owner=ctx.owner_filter(u))

    @r.get("/studies/{study_id}")
    def get_study(study_id: int, u: Optional[str] = Depends(ctx.user)) -> dict:
        return study_for(study_id, u)

    @r.post("/studies/{study_id}/cancel")
    def cancel_study(study_id: int, u: Optional[str] = Depends(ctx.user)) -> dict:
        study_for(study_id, u)
        return studies.cancel_study(settings, study_id)

    return r
