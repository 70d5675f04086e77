"""Optional login. Users come from STUDIO_USERS ("alice:secret,bob:hunter2") or
STUDIO_USERS_FILE (one `name:password` or `name:sha256:<hex>` per line);
STUDIO_ADMINS names admins (comma-separated). With no users, login is off and
the studio only serves on loopback addresses unless explicitly overridden.

The UI uses Gradio's login page; the REST API takes HTTP Basic credentials, or a
user's API key as `Authorization: Bearer <key>` (workers.api_keys; `key_lookup`),
on every route, its documents included (`RequireLogin`, in front of the whole /api
app); only /api/live, which reveals nothing, answers without. The OpenAI-compatible
/v1 takes the API key only (studio.openai_api). Failed attempts are rate limited per
user name and client address."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from fastapi import HTTPException, Request

MAX_FAILURES = 5
WINDOW_S = 60.0


def _hash(pw: str) -> str:
    return hashlib.sha256(pw.encode()).hexdigest()


@dataclass
class Auth:
    users: dict[str, str] = field(default_factory=dict)      # name -> sha256 hex of password
    admins: set[str] = field(default_factory=set)
    # API key -> its owner's name, or None for no such (unrevoked) key; set by the server
    key_lookup: Optional[Callable[[str], Optional[str]]] = None
    _failures: dict = field(default_factory=lambda: defaultdict(deque))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    @classmethod
    def from_env(cls) -> "Auth":
        users: dict[str, str] = {}
        entries = [e for e in os.environ.get("STUDIO_USERS", "").split(",") if e.strip()]
        path = os.environ.get("STUDIO_USERS_FILE")
        if path:
            with open(path, encoding="utf-8") as f:
                entries += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        for e in entries:
            name, _, secret = e.strip().partition(":")
            if not name or not secret:
                raise ValueError("STUDIO_USERS: each entry must be name:password")
            # the name is stored as each run's owner (a 100-character column on every database)
            if len(name) > 100 or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
                raise ValueError(f"STUDIO_USERS: user name {name[:50]!r} must be at most 100 printable characters")
            users[name] = secret[len("sha256:"):] if secret.startswith("sha256:") else _hash(secret)
        admins = {a.strip() for a in os.environ.get("STUDIO_ADMINS", "").split(",") if a.strip()}
        return cls(users=users, admins=admins)

    def is_admin(self, user: Optional[str]) -> bool:
        return user is not None and user in self.admins

    def _limited(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            q = self._failures[key]
            while q and now - q[0] > WINDOW_S:
                q.popleft()
            return len(q) >= MAX_FAILURES

    def _fail(self, key: str) -> None:
        with self._lock:
            self._failures[key].append(time.monotonic())

    def check(self, name: str, password: str, client: str = "") -> bool:
        key = f"{name}|{client}"
        if self._limited(key) or self._limited(f"*|{client}"):
            return False
        expected = self.users.get(name)
        ok = expected is not None and hmac.compare_digest(expected, _hash(password))
        if not ok:
            self._fail(key)
            self._fail(f"*|{client}")
        return ok

    def key_user(self, key: str, client: str = "") -> Optional[str]:
        """The user an API key belongs to (a user of this studio's login), or None;
        failures count against the client address like wrong passwords."""
        if self._limited(f"*|{client}"):
            return None
        name = self.key_lookup(key) if (self.key_lookup and key) else None
        if name is None or name not in self.users:
            self._fail(f"*|{client}")
            return None
        return name

    def api_user(self, request: Request) -> str:
        """The user named by HTTP Basic credentials or a Bearer API key, or 401/429."""
        client = request.client.host if request.client else ""
        hdr = request.headers.get("authorization", "")
        if hdr.lower().startswith("bearer ") and self.key_lookup is not None:
            if self._limited(f"*|{client}"):
                raise HTTPException(429, "too many failed logins; wait a minute")
            name = self.key_user(hdr[7:].strip(), client)
            if name is None:
                raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
            return name
        if not hdr.lower().startswith("basic "):
            raise HTTPException(401, "login required (HTTP Basic)", headers={"WWW-Authenticate": "Basic"})
        try:
            name, _, pw = base64.b64decode(hdr[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(401, "malformed credentials", headers={"WWW-Authenticate": "Basic"})
        if self._limited(f"{name}|{client}"):
            raise HTTPException(429, "too many failed logins; wait a minute")
        if not self.check(name, pw, client):
            raise HTTPException(401, "wrong user name or password", headers={"WWW-Authenticate": "Basic"})
        return name

    def ui_user(self, request) -> Optional[str]:
        return getattr(request, "username", None)

    def gradio_check(self, name: str, password: str) -> bool:
        return self.check(name, password, "ui")


class RequireLogin:
    """Pure-ASGI gate in front of the whole /api application: with login on, every
    request (routes, /openapi.json, /docs, unknown paths alike) needs HTTP Basic
    credentials, answered 401 (or 429) before any route, middleware or cache runs.
    Only the paths in `open_paths` answer without: a liveness probe that reveals
    nothing. The user is left in scope["state"]["user"] for the route dependency."""

    def __init__(self, app, auth: Auth, open_paths: frozenset = frozenset({"/live"})):
        self.app, self.auth, self.open_paths = app, auth, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and path in self.open_paths:
            return await self.app(scope, receive, send)
        try:
            user = self.auth.api_user(Request(scope))
        except HTTPException as e:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps({"detail": e.detail}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
            await send({"type": "http.response.start", "status": e.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)
