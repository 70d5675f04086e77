"""OpenAI's error shape for every /v1 answer that is not a success, and the API-key gate.

Every error is `{"error": {"message", "type", "param", "code"}}` with the HTTP status
OpenAI uses (400 bad request, 401 bad or missing key, 404 unknown model or path, 422
a request that does not validate, 429 too many failed keys, 500 a fault of ours), so
OpenAI clients raise their usual exceptions (`openai.AuthenticationError`, ...).

`BearerGate` sits in front of the whole /v1 app when login is on: a request needs
`Authorization: Bearer <key>` with a live API key of a studio user (workers.api_keys,
through `Auth.key_user`), checked before any route runs; the user is left in
scope["state"]["user"]. With login off, /v1 is open as /api is.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("peft_studio.v1")

# status -> (type, code) for errors raised without their own
DEFAULTS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
            403: ("invalid_request_error", "forbidden"), 404: ("invalid_request_error", "not_found"),
            405: ("invalid_request_error", "method_not_allowed"), 409: ("invalid_request_error", "conflict"),
            413: ("invalid_request_error", "request_too_large"), 422: ("invalid_request_error", "invalid_value"),
            429: ("rate_limit_error", "rate_limit_exceeded"), 503: ("server_error", "unavailable")}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        t, c = DEFAULTS.get(status, ("server_error", None))
        self.status, self.message, self.param = status, message, param
        self.type, self.code = type or t, code if code is not None else c


def error_body(status: int, message: str, *, param=None, code=None, type=None) -> dict:
    e = OpenAIError(status, message, param=param, code=code, type=type)
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_response(e: OpenAIError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=headers)


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts)


def install_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def _openai(_req, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        errs = exc.errors() or [{"loc": (), "msg": "invalid request"}]
        if errs[0].get("type") == "json_invalid":
            return error_response(OpenAIError(400, "body: not valid JSON", param="body"))
        parts, params = [], []
        for e in errs[:5]:
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            where = _loc(e.get("loc", ()))
            if not where and ": " in msg:        # a check across fields names its field first
                where, msg = msg.split(": ", 1)
            parts.append(f"{where or 'body'}: {msg}")
            params.append(where or None)
        return error_response(OpenAIError(422, "; ".join(parts), param=params[0]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route on /v1 (routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions)"
        return error_response(OpenAIError(exc.status_code, detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _fault(_req, exc: Exception):
        log.exception("v1: %s", exc)
        return error_response(OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                          code="internal_error"))


class BearerGate:
    """Pure-ASGI gate: every /v1 request needs a valid API key (see the module docstring)."""

    def __init__(self, app, auth):
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        client = request.client.host if request.client else ""
        hdr = request.headers.get("authorization", "")
        if self.auth._limited(f"*|{client}"):
            return await self._refuse(send, OpenAIError(429, "too many failed API keys from this address; wait a "
                                                             "minute"))
        if not hdr.lower().startswith("bearer ") or not hdr[7:].strip():
            return await self._refuse(send, OpenAIError(
                401, "login is on: send your API key as 'Authorization: Bearer <key>' (create one under API keys "
                     "in the studio, or with `peft-studio keys create NAME`)", code="missing_api_key"))
        user = self.auth.key_user(hdr[7:].strip(), client)
        if user is None:
            return await self._refuse(send, OpenAIError(401, "invalid or revoked API key"))
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, e: OpenAIError) -> None:
        body = json.dumps({"error": {"message": e.message, "type": e.type, "param": e.param,
                                     "code": e.code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if e.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
