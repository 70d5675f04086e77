"""The OpenAI-compatible API under /v1: every succeeded causal-LM run (and its base)
behind `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`, so any
OpenAI client, agent framework or evaluation tool can call a run (docs/serving.md).

A second FastAPI app beside /api (studio.server mounts it at /v1). Its routes are
registered as /api's are: each module of `ROUTE_MODULES` defines
`routes(ctx: ApiContext) -> APIRouter` (studio.routes.ApiContext: the settings, the
login dependency `user`, `owner_filter`, `load_run_for` and `is_admin`). With login on,
`BearerGate` (studio.openai_api.errors) admits only requests with a user's API key
(`Authorization: Bearer <key>`, workers.api_keys), and a key sees what its owner sees
in /api. Every error is in OpenAI's shape.

Computing: studio.openai_api.targets finds and loads the model (the Playground's
cache of bases, engine.adapter_bank views for runs); studio.openai_api.runner batches
concurrent requests for one model into one decode (engine.serve_batcher,
engine.serving)."""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request

from workers.settings import Settings

from ..routes import ApiContext, make_context
from . import chat, completions, models

ROUTE_MODULES = (models, completions, chat)


def context(settings: Settings, auth=None) -> ApiContext:
    async def user(request: Request) -> Optional[str]:
        return getattr(request.state, "user", None) if auth else None   # BearerGate has checked the key

    return make_context(settings, auth, user)


def build_v1(settings: Settings, auth=None) -> FastAPI:
    """The /v1 application. With `auth` (a studio.auth.Auth with users and a
    `key_lookup`), every request needs a user's API key."""
    from .errors import BearerGate, install_handlers

    app = FastAPI(title="PEFT Studio OpenAI-compatible API", version="0.1.0", openapi_url="/openapi.json",
                  docs_url=None, redoc_url=None)
    install_handlers(app)
    ctx = context(settings, auth)
    for module in ROUTE_MODULES:
        app.include_router(module.routes(ctx))
    if auth:
        app.add_middleware(BearerGate, auth=auth)
    return app
