"""The REST API under /api (FastAPI; OpenAPI at /api/openapi.json): the app, its login
dependency, owner checks and error handlers. The routes themselves live in studio.routes,
one module per concern, all registered the same way."""

from __future__ import annotations

import json
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from workers.settings import Settings

from . import service


def run_config_schema() -> dict:
    from engine.config import RunConfig

    return RunConfig.model_json_schema()


def flat_routes(app) -> list:
    """The app's routes with included routers expanded (FastAPI 0.165 keeps an included
    router as one lazy entry of `app.routes`; our routers are included without a prefix)."""
    out = []
    for route in app.routes:
        inner = getattr(route, "original_router", None)
        out += flat_routes(inner) if inner is not None else [route]
    return out


def build_api(settings: Settings, auth=None) -> FastAPI:
    """The /api application. With `auth` (a studio.auth.Auth with users), every
    route needs credentials and non-admins see only their own runs."""
    api = FastAPI(title="PEFT Studio API", version="0.1.0", openapi_url="/openapi.json", docs_url="/docs",
                  redoc_url=None)

    async def user(request: Request) -> Optional[str]:
        # the RequireLogin gate (added last, below) has already checked the credentials
        if not auth:
            return None
        return getattr(request.state, "user", None) or auth.api_user(request)

    @api.exception_handler(service.NotFound)
    async def _not_found(_req, exc):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(req, exc):
        # fuzzing: FastAPI answers a body that is not JSON with a bare "There was an error
        # parsing the body"; every 4xx detail names the field, so say "body: ..."
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            exc = StarletteHTTPException(400, "body: not valid JSON", headers=exc.headers)
        elif exc.status_code == 400 and isinstance(exc.detail, str) and "multipart" in exc.detail.lower():
            exc = StarletteHTTPException(400, f"file: {exc.detail[0].lower()}{exc.detail[1:]}", headers=exc.headers)
        return await http_exception_handler(req, exc)

    @api.exception_handler(service.SubmitError)
    async def _submit_error(_req, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @api.exception_handler(service.InternalError)
    async def _internal_error(_req, exc):
        # a check of ours that broke (the estimator, the structure check): 500 with the reason
        return JSONResponse({"detail": str(exc)}, status_code=500)

    from workers.store import ArtifactCorrupt, StoreError

    @api.exception_handler(StoreError)
    async def _store_error(_req, exc):
        # corrupt bytes are refused for good (500); an unreachable store may come back (503)
        return JSONResponse({"detail": str(exc)}, status_code=500 if isinstance(exc, ArtifactCorrupt) else 503)

    from .routes import ROUTE_MODULES, make_context

    ctx = make_context(settings, auth, user)
    for module in ROUTE_MODULES:
        api.include_router(module.routes(ctx))
        for cls, kwargs in getattr(module, "middleware", lambda _ctx: [])(ctx):
            api.add_middleware(cls, **kwargs)

    def custom_openapi():
        if api.openapi_schema:
            return api.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
        rc = run_config_schema()
        defs = rc.pop("$defs", {})
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for k, v in defs.items():
            comps[k] = v
        comps["RunConfig"] = rc
        text = json.dumps(schema).replace("#/$defs/", "#/components/schemas/")
        api.openapi_schema = json.loads(text)
        return api.openapi_schema

    api.openapi = custom_openapi
    if auth:   # last, so outermost: before every other middleware, route, /docs and /openapi.json
        from .auth import RequireLogin

        api.add_middleware(RequireLogin, auth=auth)
    return api
