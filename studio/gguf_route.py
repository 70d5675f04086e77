"""`GET /api/runs/{run_id}/gguf?quant=f16|q8_0`: a Llama-architecture run's merged
model as one GGUF file (studio.gguf builds and caches it). Registered from
studio.api.build_api, so the login gate and the owner check apply as to every
other run route."""

from __future__ import annotations

from typing import Callable, Optional

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, Response

from workers.settings import Settings

from . import service

ERRORS = {404: {"description": "no such run (or not yours)"},
          409: {"description": "the run cannot be exported: not finished, a method that does not merge, "
                               "not a Llama-architecture causal LM, or a tokenizer GGUF cannot express"},
          422: {"description": "quant is not one of f16, q8_0"}}


def register_gguf_routes(api: FastAPI, settings: Settings, user: Callable, load_run_for: Callable) -> None:
    """Add the GGUF route to `api`; `user` is its credentials dependency and
    `load_run_for(run_id, user)` its owner-checked run lookup (404 otherwise)."""

    @api.get("/runs/{run_id}/gguf", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS})
    def gguf(run_id: int, quant: str = Query("f16", max_length=40, description="f16 or q8_0"),
             u: Optional[str] = Depends(user)):
        """The run's adapter merged into the base weights, as GGUF (llama.cpp, Ollama,
        LM Studio): f16, or q8_0 (8-bit blocks, about half the size). Built on first
        request, then cached."""
        from .artifacts import ArtifactError
        from .gguf import BadQuant, gguf_file

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
