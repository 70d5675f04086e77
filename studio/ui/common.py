"""What every tab shares: who is asking, which runs they may see (the one run
guard), and files handed to the browser for download."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Optional

import gradio as gr

from workers.settings import Settings

from .. import service

GIB = 1024 ** 3
SELECT_A_RUN = "Select a run in the table (or type its id)."


class NoRunSelected(service.NotFound):
    """No run id given; the message says how to pick one."""


class Ctx:
    """The settings and the login of one studio, and the questions tabs ask of them.
    With `auth` (a studio.auth.Auth with users), non-admins see only their own runs."""

    def __init__(self, settings: Settings, auth=None):
        self.settings = settings
        self.auth = auth

    def user(self, request: Optional[gr.Request]) -> Optional[str]:
        if self.auth is None or request is None:
            return None
        return self.auth.ui_user(request)

    def visible_owner(self, request: Optional[gr.Request]) -> Optional[str]:
        """Whose runs this user sees: None = everyone's (no login, or an admin)."""
        u = self.user(request)
        return None if u is None or (self.auth and self.auth.is_admin(u)) else u

    def may_see(self, run: dict, request: Optional[gr.Request]) -> bool:
        ow = self.visible_owner(request)
        return ow is None or run.get("owner") == ow

    def visible_run(self, rid, request: Optional[gr.Request]) -> dict:
        """Run `rid` if this request may see it. Raises NoRunSelected for no id and
        service.NotFound (naming the run) for a run that is missing or someone else's."""
        if not rid:
            raise NoRunSelected(SELECT_A_RUN)
        run = service.get_run(self.settings, int(rid))
        if not self.may_see(run, request):
            raise service.NotFound(f"run {int(rid)} not found")
        return run

    def visible_runs(self, request: Optional[gr.Request], **kw) -> list[dict]:
        return service.list_runs(self.settings, owner=self.visible_owner(request), **kw)

    def workers(self) -> list[dict]:
        return service.list_workers(self.settings)


def error_text(e: Exception) -> str:
    """A guard's or the service's error as the one-line message a tab shows."""
    return str(e) if isinstance(e, NoRunSelected) else f"✗ {e}"


def write_download(data: bytes, name: str) -> str:
    """Bytes to a file Gradio may serve (under the temp dir), returning its path."""
    d = Path(tempfile.gettempdir()) / f"peft-studio-downloads-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / service.safe_filename(name)
    fd, tmp = tempfile.mkstemp(dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return str(path)


def link_download(src: str | Path, name: str) -> str:
    """A file already on disk offered for download under `name`: hard-linked into
    the download folder (streamed copy across filesystems), never read into memory."""
    d = Path(tempfile.gettempdir()) / f"peft-studio-downloads-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / service.safe_filename(name)
    tmp = d / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, path)
    return str(path)


def run_choices(runs: list[dict], statuses: tuple = ("succeeded",)) -> list[str]:
    """Dropdown labels '#id name (method, status)' of the runs whose status is in `statuses`."""
    return [f"#{r['id']} {r['name']} ({r['method']}, {r['status']})" for r in runs
            if not statuses or r["status"] in statuses]
