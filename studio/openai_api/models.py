"""GET /v1/models and GET /v1/models/{id}: what the caller can call (studio.openai_api.targets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends

from .errors import OpenAIError
from .targets import list_models

if TYPE_CHECKING:
    from ..routes import ApiContext


def routes(ctx: "ApiContext") -> APIRouter:
    api = APIRouter()

    @api.get("/models")
    def models(u: Optional[str] = Depends(ctx.user)) -> dict:
        """The base models and every succeeded causal-LM run the caller may see (`run-<id>`)."""
        return {"object": "list", "data": list_models(ctx.settings, ctx.owner_filter(u))}

    @api.get("/models/{model_id:path}")
    def model(model_id: str, u: Optional[str] = Depends(ctx.user)) -> dict:
        for m in list_models(ctx.settings, ctx.owner_filter(u)):
            if m["id"] == model_id:
                return m
        raise OpenAIError(404, f"model: {model_id!r} does not exist or you do not have access to it",
                          param="model", code="model_not_found")

    return api
