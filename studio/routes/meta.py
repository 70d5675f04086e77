"""Routes about the studio itself: liveness, health, the workers and the methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends

from .. import service

if TYPE_CHECKING:
    from . import ApiContext


def routes(ctx: ApiContext) -> APIRouter:
    api, settings, user = APIRouter(), ctx.settings, ctx.user

    @api.get("/live")
    def live() -> dict:
        """Liveness: answers without credentials, and so reveals nothing."""
        return {"ok": True}

    @api.get("/health")
    def health(u: Optional[str] = Depends(user)) -> dict:
        return {"status": "ok", "runs": service.count_runs(settings)}

    @api.get("/workers")
    def workers(u: Optional[str] = Depends(user)) -> list[dict]:
        return service.list_workers(settings)

    @api.get("/methods")
    def methods(u: Optional[str] = Depends(user)) -> list[dict]:
        from engine.methods import METHODS

        return [{"name": s.name, "paper": s.paper, "summary": s.summary, "trains": s.trains,
                 "mergeable": s.mergeable, "peft_format": s.peft_export is not None} for s in METHODS.values()]

    return api
