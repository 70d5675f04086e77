"""The REST API under /api (FastAPI; OpenAPI at /api/openapi.json)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Literal, Optional

from fastapi import APIRouter, Body, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from workers.settings import Settings

from . import service


def run_config_schema() -> dict:
    from engine.config import RunConfig

    return RunConfig.model_json_schema()


def route_path(scope) -> str:
    """The request path below the app's mount point (/api)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def send_json(send, status: int, body: bytes, *extra_headers: tuple) -> None:
    """Answer an ASGI request with encoded JSON, bypassing the framework."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class UploadSizeLimit:
    """Pure-ASGI middleware: a POST /datasets whose Content-Length already says it is
    over the upload limit is answered 413 before a byte of the body is read
    (Starlette would otherwise spool the whole multipart body first). Bodies sent
    without a length are still counted and refused by the route."""

    FRAMING = 64 << 10     # multipart boundaries and part headers on top of the file

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and route_path(scope) == "/datasets":
            length = dict(scope.get("headers") or []).get(b"content-length")
            try:
                too_big = length is not None and int(length) > self.limit + self.FRAMING
            except ValueError:
                too_big = False
            if too_big:
                body = json.dumps({"detail": f"upload: over the limit of {self.limit / 2**20:.0f} MiB "
                                             f"(Content-Length {int(length)} bytes; STUDIO_MAX_UPLOAD_MB)."
                                             f"{service.LARGE_DATA_HINT}"}).encode()
                await send_json(send, 413, body, (b"connection", b"close"))
                return
        await self.app(scope, receive, send)


def build_api(settings: Settings, auth=None) -> FastAPI:
    """The /api application. With `auth` (a studio.auth.Auth with users), every
    route needs credentials and non-admins see only their own runs."""
    api = FastAPI(title="PEFT Studio API", version="0.1.0", openapi_url="/openapi.json", docs_url="/docs",
                  redoc_url=None)
    api.add_middleware(UploadSizeLimit, limit=settings.max_upload_bytes)

    async def user(request: Request) -> Optional[str]:
        # the RequireLogin gate (added last, below) has already checked the credentials
        if not auth:
            return None
        return getattr(request.state, "user", None) or auth.api_user(request)

    from .estimate_route import EstimateFastPath

    # a clean GET /estimate is answered here, before FastAPI runs; login is checked through `user`
    api.add_middleware(EstimateFastPath, settings=settings, user=user)

    def is_admin(u: Optional[str]) -> bool:
        return bool(auth) and auth.is_admin(u)

    def owner_filter(u: Optional[str]) -> Optional[str]:
        return None if u is None or is_admin(u) else u

    def load_run_for(run_id: int, u: Optional[str]) -> dict:
        # fuzzing: an id beyond the runs.id column (or <= 0) can name no run; without this
        # check SQLite raised OverflowError (a 500) for /runs/9223372036854775808, and
        # PostgreSQL, whose INTEGER is 32-bit, "integer out of range" (a 500) for /runs/2**40
        if not 0 < run_id < 2**31:
            raise HTTPException(404, f"run_id: run {run_id} not found")
        try:
            run = service.get_run(settings, run_id)
        except service.NotFound as e:
            raise HTTPException(404, str(e))
        ow = owner_filter(u)
        if ow is not None and run.get("owner") != ow:
            raise HTTPException(404, f"run {run_id} not found")
        return run

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

    @api.get("/live")
    def live() -> dict:
        """Liveness: answers without credentials, and so reveals nothing."""
        return {"ok": True}

    @api.get("/health")
    def health(u: Optional[str] = Depends(user)) -> dict:
        return {"status": "ok", "runs": service.count_runs(settings)}

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
        return service.list_runs(settings, owner=owner_filter(u), status=status)

    @api.get("/runs/{run_id}")
    def run(run_id: int, u: Optional[str] = Depends(user)) -> dict:
        return load_run_for(run_id, u)

    @api.get("/runs/{run_id}/metrics")
    def metrics(run_id: int, after_step: int = Query(0, ge=0, lt=2**63), u: Optional[str] = Depends(user)) -> list[dict]:
        load_run_for(run_id, u)
        # metrics.step is an INTEGER column (32-bit on PostgreSQL: a larger bound was a 500);
        # no step is larger, so the clamped bound answers the same
        return service.get_metrics(settings, run_id, min(after_step, 2**31 - 1))

    @api.get("/runs/{run_id}/adapter", response_class=Response,
             responses={200: {"content": {"application/zip": {}}}})
    def adapter(run_id: int, u: Optional[str] = Depends(user)):
        """The adapter zip, streamed from this studio's verified copy of the store's object."""
        from fastapi.responses import FileResponse

        load_run_for(run_id, u)
        try:
            path, name = service.adapter_file(settings, run_id)
        except service.NotFound as e:
            raise HTTPException(404, str(e))
        return FileResponse(path, media_type="application/zip", filename=name)

    @api.get("/runs/{run_id}/merged", response_class=Response,
             responses={200: {"content": {"application/zip": {}}}})
    def merged(run_id: int, u: Optional[str] = Depends(user)):
        """The run's adapter merged into the base weights (built on first request)."""
        from fastapi.responses import FileResponse

        from .artifacts import ArtifactError, merged_zip_path

        load_run_for(run_id, u)
        try:
            path, name = merged_zip_path(settings, run_id)
        except service.NotFound as e:
            raise HTTPException(404, str(e))
        except ArtifactError as e:
            raise HTTPException(409, str(e))
        return FileResponse(path, media_type="application/zip", filename=name)

    from .gguf_route import register_gguf_routes
    register_gguf_routes(api, settings, user, load_run_for)   # GET /runs/{id}/gguf (studio.gguf_route)

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

    @api.get("/estimate")
    async def estimate(request: Request, model: str = Query(..., min_length=1, max_length=500),
                       method: str = Query(..., min_length=1, max_length=40),
                       r: Optional[int] = Query(None, ge=1, le=4096),
                       target_modules: Optional[str] = Query(None, max_length=1000),
                       batch: int = Query(1, ge=1, le=65536), seq: int = Query(512, ge=1, le=1048576),
                       dtype: Literal["fp32", "fp16", "bf16"] = "bf16",
                       quant: Literal["none", "nf4", "nf4-dq"] = "none",
                       formula: Literal["slide", "appendix", "model"] = "model",
                       optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adamw8bit"] = "adamw",
                       grad_checkpointing: bool = False,
                       task: Optional[Literal["classification", "causal_lm"]] = None,
                       world_size: int = Query(1, ge=1, le=4096),
                       strategy: Literal["ddp", "fsdp"] = "ddp",
                       u: Optional[str] = Depends(user)) -> dict:
        """Memory per device for one training step (`engine.estimator.estimate`, whose
        answers are cached there): `world_size` devices with `strategy` ddp or fsdp.
        A clean query is answered before FastAPI runs (studio.estimate_route)."""
        from .estimate_route import estimate_answer

        body = estimate_answer(settings, model=model, method=method, r=r, target_modules=target_modules,
                               batch=batch, seq=seq, dtype=dtype, quant=quant, formula=formula,
                               optimizer=optimizer, grad_checkpointing=grad_checkpointing, task=task,
                               world_size=world_size, strategy=strategy)
        return Response(body, media_type="application/json")

    @api.post("/datasets", status_code=201)
    def upload_dataset(file: UploadFile = File(...), u: Optional[str] = Depends(user)) -> dict:
        # the incoming bytes go to a dot-file in the uploads dir (not the system temp dir),
        # removed whatever happens; save_upload checks and stores them under a new name
        settings.ensure_dirs()
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=settings.uploads_dir)
        try:
            limit = settings.max_upload_bytes
            written = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := file.file.read(1 << 20):
                    written += len(chunk)
                    if written > limit:
                        raise HTTPException(413, f"upload: over the limit of {limit / 2**20:.0f} MiB "
                                                 f"(STUDIO_MAX_UPLOAD_MB).{service.LARGE_DATA_HINT}")
                    out.write(chunk)
            return service.save_upload(settings, file.filename or "upload", tmp, owner=u)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @api.get("/datasets")
    def datasets(u: Optional[str] = Depends(user)) -> list[dict]:
        return service.list_uploads(settings, owner=owner_filter(u))

    from .generate_route import register_generate_routes
    register_generate_routes(api, settings, user, load_run_for)   # POST /generate (studio.generate_route)

    @api.get("/workers")
    def workers(u: Optional[str] = Depends(user)) -> list[dict]:
        return service.list_workers(settings)

    @api.get("/methods")
    def methods(u: Optional[str] = Depends(user)) -> list[dict]:
        from engine.methods import METHODS

        return [{"name": s.name, "paper": s.paper, "summary": s.summary, "trains": s.trains,
                 "mergeable": s.mergeable, "peft_format": s.peft_export is not None} for s in METHODS.values()]

    from .compare_route import register_compare_routes
    register_compare_routes(api, settings, user, owner_filter)   # GET /compare (studio.compare_route)

    from types import SimpleNamespace

    from .studies_route import routes as study_routes
    api.include_router(study_routes(SimpleNamespace(settings=settings, user=user, owner_filter=owner_filter)))

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
        text = __import__("json").dumps(schema).replace("#/$defs/", "#/components/schemas/")
        api.openapi_schema = __import__("json").loads(text)
        return api.openapi_schema

    api.openapi = custom_openapi
    if auth:   # last, so outermost: before every other middleware, route, /docs and /openapi.json
        from .auth import RequireLogin

        api.add_middleware(RequireLogin, auth=auth)
    return api
