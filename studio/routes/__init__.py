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

from workers.settings import Settings


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    user: Callable[..., Awaitable[Optional[str]]]
    owner_filter: Callable[[Optional[str]], Optional[str]]
    load_run_for: Callable[[int, Optional[str]], dict]
    is_admin: Callable[[Optional[str]], bool]


from . import benchmarks, compare, datasets, estimate, generate, gguf, meta, runs, studies  # noqa: E402  (they import ApiContext)

ROUTE_MODULES = (meta, runs, gguf, estimate, datasets, generate, compare, studies, benchmarks)
