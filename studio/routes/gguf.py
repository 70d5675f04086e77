"""`GET /api/runs/{run_id}/gguf?quant=f16|q8_0`: a decoder run's merged
model as one GGUF file (studio.gguf builds and caches it). Registered from
studio.routes like every other /api route, so the login gate and the owner check apply as to every
other run route."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, Response

from .. import service

if TYPE_CHECKING:
    from . import ApiContext

ERRORS = {404: {"description": "no such run (or not yours)"},
          409: {"description": "the run cannot be exported: not finished, a method that does not merge, "
                               "not a causal LM of a family llama.cpp runs, or a tokenizer GGUF cannot express"},
          422: {"description": "quant is not one of f16, q8_0"}}


def routes(ctx: ApiContext) -> APIRouter:
    """GET /runs/{run_id}/gguf, owner-checked like every run route."""
    api, settings, user, load_run_for = APIRouter(), ctx.settings, ctx.user, ctx.load_run_for

    @api.get("/runs/{run_id}/gguf", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS})
    def gguf(run_id: int, quant: str = Query("f16", max_length=40, description="f16 or q8_0"),
             u: Optional[str] = Depends(user)):
        """The run's adapter merged into the base weights, as GGUF (llama.cpp, Ollama,
        LM Studio): f16, or q8_0 (8-bit blocks, about half the size). Built on first
        request, then cached."""
        from ..artifacts import ArtifactError
        from ..gguf import BadQuant, gguf_file

        load_run_for(run_id, u)
        try:
            path, name = gguf_file(settings, run_id, quant)
        except BadQuant as e:
            raise HTTPException(422, str(e))
        except service.NotFound as e:
            raise HTTPException(404, str(e))
        except ArtifactError as e:
            raise HTTPException(409, str(e))
        return FileResponse(path, media_type="application/octet-stream", filename=name)

    return api
