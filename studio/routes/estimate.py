"""GET /api/estimate: the route, the one function that answers it, and a pure-ASGI fast path.

The estimate is arithmetic over a config (`engine.estimator.estimate`, well under a
millisecond); answered through FastAPI, its dependency solving and pydantic
validation of fifteen query parameters cost about as much again. `EstimateFastPath`
answers a clean query before FastAPI runs: every parameter known, given once and
valid by the same rules as the FastAPI route's signature (`PARAMS` mirrors it;
tests/test_api_estimate.py holds the two equal). Anything else — a bad value, an
unknown or repeated parameter, a form the fast parser does not take (`r=08`,
`grad_checkpointing=yes`), an estimator error — goes on to the FastAPI route, which
answers it as before (422 naming the field). Both paths compute the body with
`estimate_answer`, and the fast path asks the route's own `user` dependency, so
login is enforced the same way on both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Literal, Optional
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import Response
from starlette.requests import Request

if TYPE_CHECKING:
    from . import ApiContext

# name -> (kind, default, rule): kind "str" (rule: (min length, max length)), "int" (rule:
# (minimum, maximum)), "choice" (rule: the allowed values), "bool". The default REQUIRED
# marks a required parameter; None an optional one. Mirrors `routes` below.
REQUIRED = object()
PARAMS: dict[str, tuple] = {
    "model": ("str", REQUIRED, (1, 500)),
    "method": ("str", REQUIRED, (1, 40)),
    "r": ("int", None, (1, 4096)),
    "target_modules": ("str", None, (0, 1000)),
    "batch": ("int", 1, (1, 65536)),
    "seq": ("int", 512, (1, 1048576)),
    "dtype": ("choice", "bf16", ("fp32", "fp16", "bf16")),
    "quant": ("choice", "none", ("none", "nf4", "nf4-dq")),
    "formula": ("choice", "model", ("slide", "appendix", "model")),
    "optimizer": ("choice", "adamw", ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adamw8bit")),
    "grad_checkpointing": ("bool", False, None),
    "task": ("choice", None, ("classification", "causal_lm")),
    "world_size": ("int", 1, (1, 4096)),
    "strategy": ("choice", "ddp", ("ddp", "fsdp")),
}
_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_DIGITS = frozenset("0123456789")


def parse_query(query_string: bytes) -> Optional[dict]:
    """The route's arguments from a query string, or None when the fast path should
    leave the request to FastAPI (anything not plainly valid). Decoded as Starlette
    decodes it (latin-1, then parse_qsl keeping blank values)."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    got: dict = {}
    for key, raw in pairs:
        spec = PARAMS.get(key)
        if spec is None or key in got:
            return None
        kind, _, rule = spec
        if kind == "str":
            if not rule[0] <= len(raw) <= rule[1]:
                return None
            got[key] = raw
        elif kind == "int":
            # plain decimal only: pydantic takes "+8", "08", " 8", "8.0" too; those go to FastAPI
            if not raw or len(raw) > 10 or raw[0] == "0" or not _DIGITS.issuperset(raw):
                return None
            value = int(raw)
            if not rule[0] <= value <= rule[1]:
                return None
            got[key] = value
        elif kind == "choice":
            if raw not in rule:
                return None
            got[key] = raw
        else:
            if raw not in _BOOLS:
                return None
            got[key] = _BOOLS[raw]
    for key, (_, default, _) in PARAMS.items():
        if key not in got:
            if default is REQUIRED:
                return None
            got[key] = default
    return got


def estimate_answer(settings, *, model: str, method: str, r: Optional[int], target_modules: Optional[str],
                    batch: int, seq: int, dtype: str, quant: str, formula: str, optimizer: str,
                    grad_checkpointing: bool, task: Optional[str], world_size: int, strategy: str) -> bytes:
    """The encoded answer (`engine.estimator.estimate(...).to_json()`, the CLI's `--json`
    shape), or HTTPException 422 naming the field."""
    # hostile input: the estimator reads any config.json it is pointed at; a path is
    # only read under the allowed model roots (STUDIO_MODEL_ROOTS), like a run's model
    if "/" in model or "\\" in model or model.startswith((".", "~")) or "\x00" in model:
        try:
            real = Path(model).expanduser().resolve()
        except (OSError, ValueError) as e:
            raise HTTPException(422, f"model: not a valid path ({e})")
        roots = [Path(p).resolve() for p in settings.model_roots]
        if not any(real == p or p in real.parents for p in roots):
            raise HTTPException(422, f"model: {model[:200]!r} is outside the allowed model roots; "
                                     f"set STUDIO_MODEL_ROOTS")
    from engine.estimator import estimate as estimate_memory
    from engine.methods.targeting import parse_target_list

    m: dict = {"name": method}
    if r is not None:
        m["r"] = r
    try:
        targets = parse_target_list(target_modules)
        if targets:
            m["target_modules"] = targets
        answer = estimate_memory(model, m, batch_size=batch, seq_len=seq, dtype=dtype, quant=quant,
                                 formula=formula, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                                 world_size=world_size, strategy=strategy,
                                 **({"task": task} if task else {})).to_json()
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError) as e:
        raise HTTPException(422, str(e))
    except OSError as e:   # fuzzing: a 500-character name raised ENAMETOOLONG (a 500)
        raise HTTPException(422, f"model: cannot be read ({e.strerror or e})")
    return json.dumps(answer, separators=(",", ":")).encode()


class EstimateFastPath:
    """Pure-ASGI middleware of the /api app: answers a clean GET /estimate itself
    (see the module docstring); every other request passes through untouched.
    `user` is the route's login dependency (called with the request; raises
    HTTPException 401/429 when login is on and the credentials are wrong)."""

    def __init__(self, app, settings, user: Callable[[Request], Awaitable[Optional[str]]]):
        self.app, self.settings, self.user = app, settings, user

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if path == "/estimate":
                args = parse_query(scope.get("query_string", b""))
                if args is not None:
                    request = Request(scope, receive)
                    try:
                        await self.user(request)
                    except HTTPException as e:
                        # a login refusal, answered (and counted) once, as FastAPI's handler answers it
                        response = await http_exception_handler(request, e)
                        return await response(scope, receive, send)
                    try:
                        body = estimate_answer(self.settings, **args)
                    except Exception:
                        # a refusal (422) or a fault: the route asks again and answers it through
                        # FastAPI's handlers, exactly as without the fast path
                        return await self.app(scope, receive, send)
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)


def routes(ctx: ApiContext) -> APIRouter:
    """GET /estimate through FastAPI: what the fast path leaves to it (anything not plainly
    valid is answered here, 422 naming the field), and the OpenAPI description."""
    api, settings, user = APIRouter(), ctx.settings, ctx.user

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
        A clean query is answered before FastAPI runs (`EstimateFastPath`)."""
        body = estimate_answer(settings, model=model, method=method, r=r, target_modules=target_modules,
                               batch=batch, seq=seq, dtype=dtype, quant=quant, formula=formula,
                               optimizer=optimizer, grad_checkpointing=grad_checkpointing, task=task,
                               world_size=world_size, strategy=strategy)
        return Response(body, media_type="application/json")

    return api


def middleware(ctx: ApiContext) -> list:
    """The fast path, asking the route's own login dependency."""
    return [(EstimateFastPath, {"settings": ctx.settings, "user": ctx.user})]
