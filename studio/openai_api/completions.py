"""POST /v1/completions: text (or token ids) continued by a base model or a run.

`prompt` is a string, a list of strings, a list of token ids, or a list of such
lists; each prompt gets `n` choices (index `prompt * n + choice`). `echo` puts the
prompt before each choice's text; with `logprobs` it also scores the prompt's tokens
(the first has no log-probability), and `max_tokens: 0` scores without generating.
This is what lm-evaluation-harness's `local-completions` model sends for
log-likelihood tasks (`echo: true, logprobs: 1, max_tokens: 1`, token-id prompts),
and reads back (`token_logprobs` and `top_logprobs` of the prompt's positions).
`stream: true` sends server-sent events, one chunk per piece of text, then
`data: [DONE]`; logprobs are not streamed (ask without `stream`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from . import runner
from .errors import OpenAIError, error_body
from .schemas import CompletionRequest
from .targets import open_target, resolve

if TYPE_CHECKING:
    from ..routes import ApiContext


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def routes(ctx: "ApiContext") -> APIRouter:
    api = APIRouter()

    @api.post("/completions", responses={200: {"content": {"text/event-stream": {}}}})
    def completions(body: CompletionRequest, u: Optional[str] = Depends(ctx.user)):
        from engine.serving import Row, text_prompt_ids

        target = resolve(ctx, body.model, u)
        opened = open_target(ctx.settings, target)
        tok = opened.tokenizer
        ids_list = [text_prompt_ids(tok, p) if isinstance(p, str) else [int(x) for x in p] for p in body.prompt]
        for ids in ids_list:
            runner.check_ids(opened, ids, body.max_tokens)
        texts = [p if isinstance(p, str) else tok.decode(ids) for p, ids in zip(body.prompt, ids_list)]
        k = body.logprobs or 0
        scores = body.echo and body.logprobs is not None
        rows = [Row(ids, runner.sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                         seed=body.seed, choice=j, stop=body.stop, top_logprobs=k,
                                         echo_scores=scores))
                for ids in ids_list for j in range(body.n)]
        head = {"id": runner.new_id("cmpl"), "object": "text_completion", "created": runner.now(),
                "model": body.model}
        prompt_tokens = sum(len(ids) for ids in ids_list)

        def prompt_of(i: int) -> str:
            return texts[i // body.n]

        if not body.stream:
            results = runner.run(opened, rows)
            choices = []
            for i, res in enumerate(results):
                text = (prompt_of(i) if body.echo else "") + res.text
                lp = None
                if body.logprobs is not None:
                    lp = runner.completion_logprobs(res.prompt_scores if body.echo else None, res.tokens, k)
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": runner.finish(
                    res.finish_reason)})
            done = sum(len(r.tokens) for r in results)
            return {**head, "choices": choices, "system_fingerprint": None,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                              "total_tokens": prompt_tokens + done}}

        def chunk(i, text, reason=None):
            return sse({**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]})

        def events():
            try:
                if body.echo:
                    for i in range(len(rows)):
                        yield chunk(i, prompt_of(i))
                for item in runner.stream(opened, rows):
                    if item[0] == "text":
                        yield chunk(item[1], item[2])
                        continue
                    results = item[1]
                    for i, res in enumerate(results):
                        yield chunk(i, "", runner.finish(res.finish_reason))
                    if body.include_usage:
                        done = sum(len(r.tokens) for r in results)
                        yield sse({**head, "choices": [], "usage": {
                            "prompt_tokens": prompt_tokens, "completion_tokens": done,
                            "total_tokens": prompt_tokens + done}})
            except OpenAIError as e:
                yield sse(error_body(e.status, e.message, param=e.param, code=e.code))
            except Exception as e:   # the status line is sent: the error goes in the stream
                yield sse(error_body(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return api
