"""Dataset uploads: POST /datasets (a file, checked and stored under a name of our own)
and GET /datasets; and the size gate that refuses an upload too big before reading it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends, File, HTTPException, UploadFile

from .. import service

if TYPE_CHECKING:
    from . import ApiContext


def route_path(scope) -> str:
    """The request path below the app's mount point (/api)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


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
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def middleware(ctx: ApiContext) -> list:
    return [(UploadSizeLimit, {"limit": ctx.settings.max_upload_bytes})]


def routes(ctx: ApiContext) -> APIRouter:
    api, settings, user = APIRouter(), ctx.settings, ctx.user

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
        return service.list_uploads(settings, owner=ctx.owner_filter(u))

    return api
