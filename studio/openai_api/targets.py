"""Which models /v1 serves to a caller, and the loaded model behind an id.

Ids: `run-<id>` for each succeeded causal-LM run the caller may see (the runs /api
shows them), and the base model names: the bundled causal LMs and the base of every
such run. A request may also name a run by its name (the newest succeeded run of
that name, among those the caller may see). Classification runs are not served: a
sequence classifier has no text to continue, and /v1 says so (400,
`model_not_supported`) rather than invent a format.

Loaded models come from the playground's cache of bases (studio.playground.CACHE),
so /v1 and the Playground share one loaded base and its attached runs' views
(engine.adapter_bank), within STUDIO_PLAYGROUND_MEMORY_GB.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from dataclasses import dataclass
from typing import Any, Hashable, Optional

from .. import artifacts, service
from .. import playground as pg
from .errors import OpenAIError

RUN_ID = re.compile(r"run-(\d{1,10})")
_LOAD_LOCK = threading.Lock()


@dataclass
class Target:
    id: str                       # as the caller named it
    run: Optional[dict]           # None: a base model
    cfg: Any                      # a RunConfig (for a base: the run config it is loaded as)


@dataclass
class Opened:
    key: Hashable                 # one model: the batcher groups requests by it
    model: Any
    tokenizer: Any
    lock: Any                     # the base's lock (shared with its other views)


def _base_config(name: str, like: Optional[Any] = None):
    from engine.config import parse_run_config

    if like is not None:
        return like
    return parse_run_config({"name": "base", "model": name, "task": "causal_lm",
                             "dataset": {"name": "demo-instruct"}, "method": {"name": "lora"}})


def visible_runs(settings, owner: Optional[str]) -> list[dict]:
    """Succeeded causal-LM runs `owner` may see (None: everyone's), newest first."""
    return [r for r in service.list_runs(settings, owner=owner, status="succeeded") if r["task"] == "causal_lm"]


def list_models(settings, owner: Optional[str]) -> list[dict]:
    """OpenAI model objects: the bases first, then the runs (`parent`: their base)."""
    from engine.serving import generating_bundled_models

    runs = visible_runs(settings, owner)
    bases = list(dict.fromkeys(generating_bundled_models() + [r["model"] for r in reversed(runs)]))
    out = [{"id": b, "object": "model", "created": 0, "owned_by": "peft-studio", "root": b, "parent": None}
           for b in bases]
    for r in runs:
        created = int(dt.datetime.fromisoformat(r["created_at"]).timestamp()) if r.get("created_at") else 0
        out.append({"id": f"run-{r['id']}", "object": "model", "created": created,
                    "owned_by": r.get("owner") or "peft-studio", "root": r["model"], "parent": r["model"],
                    "name": r["name"], "method": r["method"]})
    return out


def _not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"model: {model!r} does not exist or you do not have access to it "
                            f"(GET /v1/models lists what you can use)", param="model", code="model_not_found")


def resolve(ctx, model: str, u: Optional[str]) -> Target:
    """The Target of a request's `model`, or an OpenAI error (404 for what the caller
    may not see, exactly as for what does not exist)."""
    from engine.config import parse_run_config
    from fastapi import HTTPException

    m = RUN_ID.fullmatch(model)
    run = None
    if m:
        try:
            run = ctx.load_run_for(int(m.group(1)), u)
        except HTTPException:
            raise _not_found(model) from None
    else:
        owner = ctx.owner_filter(u)
        named = [r for r in service.list_runs(ctx.settings, owner=owner, status="succeeded") if r["name"] == model]
        if named:
            run = service.get_run(ctx.settings, named[0]["id"])
    if run is not None:
        if run["status"] != "succeeded" or not run.get("adapter"):
            raise OpenAIError(404, f"model: run {run['id']} is {run['status']}; only succeeded runs are served",
                              param="model", code="model_not_ready")
        cfg = parse_run_config(run["config"])
        if cfg.task != "causal_lm":
            raise OpenAIError(400, f"model: run {run['id']} is a {cfg.task} run; /v1 serves causal-LM runs only "
                                   f"(try a classifier in the Playground or with POST /api/generate)",
                              param="model", code="model_not_supported")
        return Target(model, run, cfg)
    from engine.serving import generating_bundled_models

    runs = visible_runs(ctx.settings, ctx.owner_filter(u))
    like = next((r for r in runs if r["model"] == model), None)
    if like is None and model not in generating_bundled_models():
        raise _not_found(model)
    return Target(model, None, _base_config(model, parse_run_config(like["config"]) if like else None))


def open_target(settings, t: Target) -> Opened:
    """Load (or reuse) the target's base and, for a run, attach its adapter."""
    chosen = pg.Chosen(t.run or {"id": 0}, t.cfg)
    key = pg.base_key(chosen)

    def load():
        try:
            loaded = artifacts.load_base(settings, t.cfg, [])
        except ValueError as e:         # engine.models.ModelLoadError
            raise OpenAIError(503, f"model: the base {t.cfg.model!r} cannot be loaded here: {e}", param="model",
                              code="model_unavailable") from None
        return loaded.model, loaded.tokenizer

    try:
        with _LOAD_LOCK:      # one load at a time: two requests for a new base must not load it twice
            bank = pg.CACHE.bank(key, load)
            if t.run is None:
                return Opened(("base", id(bank)), bank.base, bank.tokenizer, bank.lock)
            view_key = chosen.view_key
            if view_key not in bank:
                session = pg.open_session(settings, [t.run])
                bank = session.bank
                model = session.columns[1].model
            else:
                model = bank.view(view_key)
    except (pg.Refused, pg.BadInput) as e:
        raise OpenAIError(503, str(e).replace("run_ids:", "model:", 1), param="model",
                          code="model_unavailable") from None
    return Opened((view_key, id(bank)), model, bank.tokenizer, bank.lock)
