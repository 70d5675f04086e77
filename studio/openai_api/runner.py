"""From a /v1 request to engine rows and back: the shared batcher, prompts to token
ids, sampling settings per choice, and OpenAI's logprobs objects.

All computing goes through one `engine.serve_batcher.Batcher` (`BATCHER`): requests
that arrive within STUDIO_V1_BATCH_MS milliseconds (default 10) for the same model
(a base, or one run's view of it) run as one batched decode
(`engine.serving.run_rows`). Requests for different runs of one base share the
base's weights (engine.adapter_bank) but not a forward: each view is its own module
tree, so the batcher runs them as separate batches, one after another.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from typing import Iterator, Optional

from engine.serve_batcher import Batcher

from .errors import OpenAIError
from .targets import Opened

BATCH_MS_ENV = "STUDIO_V1_BATCH_MS"
BATCH_ROWS = 64


def _window() -> float:
    try:
        ms = float(os.environ.get(BATCH_MS_ENV, "10"))
    except ValueError:
        ms = 10.0
    return min(max(ms, 0.0), 1000.0) / 1000.0


BATCHER = Batcher(window_s=_window(), max_rows=BATCH_ROWS)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def sampling(*, max_tokens: int, temperature: float, top_p: float, seed: Optional[int], choice: int,
             stop: list[str], top_logprobs: int = 0, echo_scores: bool = False):
    from engine.serving import Sampling

    s = None if seed is None else (int(seed) + choice) % 2**63
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=s, stop=tuple(stop or ()),
                    top_logprobs=top_logprobs, echo_scores=echo_scores)


def check_ids(opened: Opened, ids: list[int], max_tokens: int, param: str = "prompt") -> None:
    from engine.serving import context_limit

    vocab = opened.model.get_input_embeddings().weight.shape[0]
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise OpenAIError(400, f"{param}: token id {bad} is outside this model's vocabulary (0..{vocab - 1})",
                          param=param)
    if not ids:
        raise OpenAIError(400, f"{param}: empty after tokenization", param=param)
    limit = context_limit(opened.model)
    if limit and len(ids) + max_tokens > limit:
        raise OpenAIError(400, f"{param}: {len(ids)} prompt tokens and max_tokens {max_tokens} exceed this "
                               f"model's context of {limit} tokens", param=param, code="context_length_exceeded")


def run(opened: Opened, rows: list) -> list:
    """Results of `rows` (engine.serving.Row), batched with whatever else waits."""
    from engine.serving import run_rows

    def compute(all_rows):
        return run_rows(opened.model, opened.tokenizer, all_rows, opened.lock)
    return BATCHER.run(opened.key, compute, rows)


def stream(opened: Opened, rows: list) -> Iterator[tuple]:
    """("text", row index, piece) as rows make text, then ("done", results). If the
    consumer stops early (a client that went away), the rows are cancelled."""
    from engine.serving import run_rows

    q: "queue.Queue" = queue.Queue()
    cancel = threading.Event()
    for i, r in enumerate(rows):
        r.on_text = (lambda piece, i=i: q.put(("text", i, piece)))
        r.cancelled = cancel

    def compute(all_rows):
        return run_rows(opened.model, opened.tokenizer, all_rows, opened.lock)
    fut = BATCHER.submit(opened.key, compute, rows)
    fut.add_done_callback(lambda f: q.put(("end",)))
    try:
        while True:
            item = q.get()
            if item[0] == "end":
                break
            yield item
        yield ("done", fut.result())
    finally:
        cancel.set()


# ---------------------------------------------------------------- logprobs objects

def completion_logprobs(prompt_scores, tokens, k: int, start_offset: int = 0) -> dict:
    """The completions API's `logprobs`: tokens, token_logprobs, top_logprobs (each
    position's `k` best alternatives and the chosen token), text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    at = start_offset
    for t in list(prompt_scores or []) + list(tokens):
        if t.logprob is None:            # the first prompt token: nothing before it to predict it
            out["tokens"].append(t.text)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(at)
            at += len(t.text)
            continue
        top = {text: lp for _tid, text, lp in t.top}
        top.setdefault(t.text, t.logprob)
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(at)
        at += len(t.text)
    return out


def chat_logprobs(tokens, k: int) -> dict:
    """The chat API's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}
    return {"content": [{**one(t.text, t.logprob), "top_logprobs": [one(x, lp) for _i, x, lp in t.top[:k]]}
                        for t in tokens]}


def finish(reason: str) -> str:
    return "length" if reason == "cancelled" else reason
