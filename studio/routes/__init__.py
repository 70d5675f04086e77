"""The /api routes, registered one way.

Every module of this package defines `routes(ctx: ApiContext) -> APIRouter` and is named in
`ROUTE_MODULES`; `studio.api.build_api` includes the routers in that order, so the login gate,
the error handlers and the OpenAPI document apply to all of them alike. A module that also
answers some requests before FastAPI runs (the estimate's pure-ASGI path) says so with
`middleware(ctx) -> [(class, kwargs), ...]`; build_api adds those next to its own.

`ApiContext` is what a route needs from the app: the settings, the login dependency `user`
(`u: Optional[str] = Depends(ctx.user)`: None with login off, else the user's name), which
owner's runs a user sees (`owner_filter`: None for everyone's), and the owner-checked run
lookup `load_run_for(run_id, u)` (the run's dict, or a 404 that reveals nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from fastapi import HTTPException

from workers.settings import Settings


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    user: Callable[..., Awaitable[Optional[str]]]
    owner_filter: Callable[[Optional[str]], Optional[str]]
    load_run_for: Callable[[int, Optional[str]], dict]
    is_admin: Callable[[Optional[str]], bool]


def make_context(settings: Settings, auth, user: Callable[..., Awaitable[Optional[str]]]) -> ApiContext:
    """The context of an app whose login dependency is `user`: with `auth` (a studio.auth.Auth
    with users) non-admins see only their own runs; without it everyone sees every run."""
    from .. import service

    def is_admin(u: Optional[str]) -> bool:
        return bool(auth) and auth.is_admin(u)

    def owner_filter(u: Optional[str]) -> Optional[str]:
        return None if u is None or is_admin(u) else u

    def load_run_for(run_id: int, u: Optional[str]) -> dict:
        # fuzzing: an id beyond the runs.id column (or <= 0) can name no run; without this
        # check SQLite raised OverflowError (a 500) for /runs/9223372036854775808, and
        # PostgreSQL, whose INTEGER is 32-bit, "integer out of range" (a 500) for /runs/2**40
        if not 0 < run_id < 2**31:
            raise HTTPException(404, f"run_id: run {run_id} not found")
        try:
            run = service.get_run(settings, run_id)
        except service.NotFound as e:
            raise HTTPException(404, str(e))
        ow = owner_filter(u)
        if ow is not None and run.get("owner") != ow:
            raise HTTPException(404, f"run {run_id} not found")
        return run

    return ApiContext(settings=settings, user=user, owner_filter=owner_filter, load_run_for=load_run_for,
                      is_admin=is_admin)


from . import benchmarks, compare, datasets, estimate, generate, gguf, meta, runs, studies  # noqa: E402  (they import ApiContext)

ROUTE_MODULES = (meta, runs, gguf, estimate, datasets, generate, compare, studies, benchmarks)
