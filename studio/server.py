"""`peft-studio serve`: FastAPI (REST at /api, the OpenAI-compatible API at /v1) with
the Gradio UI mounted at /, database migrations at start, a stale-run reaper, and —
with no broker configured — an embedded worker process that it supervises."""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import socket
import sys
import threading

import uvicorn
from fastapi import FastAPI

from workers.settings import Settings, load_settings, redact_url

from .runtime import WorkerSupervisor, prepare_database, reaper_loop, store_problem

log = logging.getLogger("peft_studio.server")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def api_key_lookup(settings: Settings):
    """API key -> its owner (workers.api_keys), for the login of /v1 and /api."""
    from workers import api_keys

    def lookup(key: str):
        found = api_keys.owner_of(settings.database_url, key)
        return found[0] if found else None
    return lookup


def build_app(settings: Settings) -> FastAPI:
    import gradio as gr

    from .api import build_api
    from .auth import Auth
    from .ui import build_ui

    from .openai_api import build_v1

    auth = Auth.from_env()
    auth.key_lookup = api_key_lookup(settings)
    app = FastAPI(title="PEFT Studio", docs_url=None, redoc_url=None, openapi_url=None)
    api = build_api(settings, auth if auth.enabled else None)
    app.mount("/api", api)
    app.mount("/v1", build_v1(settings, auth if auth.enabled else None))
    demo = build_ui(settings, auth if auth.enabled else None)
    kw = {"auth": auth.gradio_check, "auth_message": "PEFT Studio login"} if auth.enabled else {}
    gr.mount_gradio_app(app, demo, path="/", footer_links=[], **kw)
    app.state.auth = auth
    return app


def serve(host: str = "127.0.0.1", port: int = 7860, allow_public: bool = False,
          embedded_worker: bool = True) -> int:
    from .auth import Auth

    settings = load_settings()
    auth = Auth.from_env()
    if not is_loopback(host) and not auth.enabled and not allow_public:
        log.error("refusing to serve on %s without login: set STUDIO_USERS or STUDIO_USERS_FILE, "
                  "or pass --allow-public-without-login", host)
        print(f"error: refusing to serve on non-loopback address {host!r} without login; set STUDIO_USERS "
              f"(user:password,...) or STUDIO_USERS_FILE, or pass --allow-public-without-login")
        return 2
    problem = store_problem(settings)   # first: upgrading the database may move adapters into the store
    if problem:
        log.error("studio not started: %s", problem)
        print(f"error: {problem}; set STUDIO_ARTIFACT_URL (and STUDIO_S3_ENDPOINT_URL / AWS credentials for s3://)",
              file=sys.stderr)
        return 2
    prepare_database(settings)
    from workers.store import get_store
    log.info("database %s · broker %s · artifact store %s · data dir %s", redact_url(settings.database_url),
             "embedded (filesystem)" if settings.embedded_broker else redact_url(settings.broker_url),
             get_store(settings).shown, settings.data_dir)
    stop = threading.Event()
    threading.Thread(target=reaper_loop, args=(settings, stop), daemon=True, name="reaper").start()
    sup = WorkerSupervisor(settings).start() if (settings.embedded_broker and embedded_worker) else None
    from .study_driver import StudyDriver
    studies = StudyDriver(settings).start()   # advances running studies (studio.study_driver)
    app = build_app(settings)
    # torch, transformers and gradio leave millions of long-lived objects behind their imports;
    # a full garbage collection walks them all and stalls the event loop (every request waiting)
    # for up to a second. Freeze them: later collections walk only what the studio makes since.
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
    finally:
        stop.set()
        studies.stop()
        if sup:
            sup.stop()
    return 0
