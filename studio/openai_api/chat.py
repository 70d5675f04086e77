"""POST /v1/chat/completions: a chat answered by a base model or a run.

The messages go through the model's chat template (engine.serving.chat_prompt_ids;
`developer` is passed as `system`); a model without a template gets a single user
message formatted as training formats prompts. Without `max_tokens` /
`max_completion_tokens` an answer runs to its end of text, at most DEFAULT_TOKENS
tokens and the model's context. `logprobs: true` (with `top_logprobs` alternatives)
reports each answer token; `stream: true` sends `chat.completion.chunk` events (the
role first, then pieces of content, then the finish reason) and `data: [DONE]`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from . import runner
from .completions import sse
from .errors import OpenAIError, error_body
from .schemas import ChatRequest

if TYPE_CHECKING:
    from ..routes import ApiContext

DEFAULT_TOKENS = 512


def routes(ctx: "ApiContext") -> APIRouter:
    from .targets import open_target, resolve

    api = APIRouter()

    @api.post("/chat/completions", responses={200: {"content": {"text/event-stream": {}}}})
    def chat(body: ChatRequest, u: Optional[str] = Depends(ctx.user)):
        from engine.serving import Row, chat_prompt_ids, context_limit

        target = resolve(ctx, body.model, u)
        opened = open_target(ctx.settings, target)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = chat_prompt_ids(opened.tokenizer, messages)
        except Exception as e:     # a template that refuses these roles (e.g. no system message)
            raise OpenAIError(400, f"messages: the model's chat template refused them: {e}",
                              param="messages") from None
        limit = context_limit(opened.model)
        new = body.new_tokens or max(1, min(DEFAULT_TOKENS, (limit - len(ids)) if limit else DEFAULT_TOKENS))
        runner.check_ids(opened, ids, new, param="messages")
        k = (body.top_logprobs or 0) if body.logprobs else 0
        rows = [Row(list(ids), runner.sampling(max_tokens=new, temperature=body.temperature, top_p=body.top_p,
                                               seed=body.seed, choice=j, stop=body.stop, top_logprobs=k))
                for j in range(body.n)]
        head = {"id": runner.new_id("chatcmpl"), "created": runner.now(), "model": body.model,
                "system_fingerprint": None}

        def usage(results):
            done = sum(len(r.tokens) for r in results)
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}

        if not body.stream:
            results = runner.run(opened, rows)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": runner.chat_logprobs(r.tokens, k) if body.logprobs else None,
                        "finish_reason": runner.finish(r.finish_reason)} for i, r in enumerate(results)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage(results)}

        def chunk(i, delta, reason=None):
            return sse({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]})

        def events():
            try:
                for i in range(len(rows)):
                    yield chunk(i, {"role": "assistant", "content": ""})
                for item in runner.stream(opened, rows):
                    if item[0] == "text":
                        yield chunk(item[1], {"content": item[2]})
                        continue
                    results = item[1]
                    for i, r in enumerate(results):
                        yield chunk(i, {}, runner.finish(r.finish_reason))
                    if body.include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(results)})
            except OpenAIError as e:
                yield sse(error_body(e.status, e.message, param=e.param, code=e.code))
            except Exception as e:   # the status line is sent: the error goes in the stream
                yield sse(error_body(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return api
