"""REST for studies (the contract in shared/DESIGN.md): POST /studies (the study request)
-> {"id"}; GET /studies; GET /studies/{id} -> {status, trials, best, ...}; POST
/studies/{id}/cancel. A bad request is a 422 naming the field; someone else's study a 404."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from .. import service, studies
from ..study_space import StudyError
from ..study_storage import StudyStorageError

if TYPE_CHECKING:
    from . import ApiContext


class StudyRequest(BaseModel):
    """The study request's shape (studio.study_space.parse_study checks the rest, naming the field)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("study", description="1 to 120 printable characters")
    base: dict[str, Any] = Field(..., description="a run config without 'method'")
    methods: list[Union[str, dict[str, Any]]] = Field(..., description="method names, or method sections with sizes")
    budget: dict[str, Any] = Field(..., description='{"trials": N} or {"gpu_hours": H} (and "max_trials")')
    metric: Optional[str] = Field(None, description="accuracy | eval_loss | perplexity | bleu | rouge_l | exact_match")
    search: Optional[dict[str, Any]] = Field(None, description="hyperparameter -> [low, high] or {choices: [...]}")
    pruner: Literal["successive_halving", "hyperband", "none"] = "successive_halving"
    parallel: Optional[int] = Field(None, description="trials in flight at once (default: one per method)")
    seed: int = 0


def routes(ctx: ApiContext) -> APIRouter:
    """`ctx` carries settings, the login dependency `user` and `owner_filter`."""
    r = APIRouter()
    settings = ctx.settings

    def study_for(study_id: int, u: Optional[str]) -> dict:
        try:
            return studies.get_study(settings, study_id, owner=ctx.owner_filter(u))
        except service.NotFound as e:
            raise HTTPException(404, str(e))

    @r.post("/studies", status_code=201)
    def create_study(body: StudyRequest, u: Optional[str] = Depends(ctx.user)) -> dict:
        try:
            return {"id": studies.create_study(settings, body.model_dump(exclude_unset=True), owner=u)}
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
