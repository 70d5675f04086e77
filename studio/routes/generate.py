"""POST /api/generate: one prompt through the base model and several finished runs'
adapters on it (studio.playground), answered whole or streamed as NDJSON.

Request: `{"run_ids": [...], "prompt": "...", "max_new_tokens": N, "temperature": t,
"top_p": p, "seed": s, "stream": false}`. Answer: `{"task", "model", "prompt", "runs",
"settings", "outputs": [{"run_id": null | id, "title", "output", ...}, ...]}`, the
base first; classification outputs carry `probabilities` (label -> probability).
With `"stream": true` the body is `application/x-ndjson`: one `{"run_id", "token"}`
line per piece of text as it is generated, then the whole answer with `"done": true`
(NDJSON: https://github.com/ndjson/ndjson-spec).

Errors: an unknown (or someone else's) run 404; a run that has no adapter, or runs
of different bases or tasks, 409; a bad prompt or setting 422 (each naming the field).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import playground as pg

if TYPE_CHECKING:
    from . import ApiContext


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_ids: list[int] = Field(..., min_length=1, max_length=pg.MAX_RUNS,
                               description="finished runs on one base model")
    prompt: str = Field(..., min_length=1, max_length=pg.MAX_INPUT_CHARS)
    max_new_tokens: int = Field(pg.DEFAULT_NEW_TOKENS, ge=1, le=pg.MAX_NEW_TOKENS, description="causal LM")
    temperature: float = Field(0.0, ge=0.0, le=5.0, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")
    seed: Optional[int] = Field(None, ge=0, lt=2**31, description="sampling seed; none: a random one (reported)")
    stream: bool = Field(False, description="NDJSON token lines, then the whole answer")


def ndjson(events) -> bytes:
    return (json.dumps(events, ensure_ascii=False) + "\n").encode()


def routes(ctx: ApiContext) -> APIRouter:
    """POST /generate (behind the app's login gate; each run owner-checked)."""
    api, settings, user, load_run_for = APIRouter(), ctx.settings, ctx.user, ctx.load_run_for

    @api.post("/generate", responses={200: {"content": {"application/x-ndjson": {}}}})
    def generate(body: GenerateRequest, u: Optional[str] = Depends(user)):
        """The base model's and each run's answer to one prompt, side by side."""
        seen = set()
        for rid in body.run_ids:
            if rid in seen:
                raise HTTPException(422, f"run_ids: run {rid} is listed twice")
            seen.add(rid)
        runs = [load_run_for(rid, u) for rid in body.run_ids]
        try:
            prompt = pg.check_prompt(body.prompt)
            gen = pg.check_settings(body.max_new_tokens, body.temperature, body.top_p, body.seed)
            session = pg.open_session(settings, runs)
        except pg.BadInput as e:
            raise HTTPException(422, str(e))
        except pg.Refused as e:
            raise HTTPException(409, str(e))
        if not body.stream:
            if session.task == "classification":
                return {**pg.answer_head(session, prompt, None), "outputs": pg.classify_many(session, prompt)}
            outs = [e for e in pg.stream_columns(session, prompt, gen) if "token" not in e]
            return {**pg.answer_head(session, prompt, gen), "outputs": outs}

        def lines():
            try:
                for event in pg.stream_many(session, prompt, gen):
                    yield ndjson(event)
            except Exception as e:   # the status line is sent: say what broke on a line of its own
                yield ndjson({"error": f"{type(e).__name__}: {e}"})
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return api
