"""Dataset paths of a run config, checked the same way by the studio (at submit
time) and the worker (at run time). No Celery here: the web process imports it.

`upload:<stored name>` names a dataset uploaded through the studio; it lives in
the artifact store, and the worker reads a verified copy from its own cache.
Any other path must lie under STUDIO_DATA_ROOTS on the worker's machine."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from sqlalchemy import select

from . import db
from .settings import Settings

UPLOAD_PREFIX = "upload:"


def upload_name(path: str) -> Optional[str]:
    """The stored name of an `upload:` reference (checked), or None for a plain path."""
    if not path.startswith(UPLOAD_PREFIX):
        return None
    name = path[len(UPLOAD_PREFIX):]
    if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 100:
        raise ValueError(f"dataset.path: invalid upload reference {path[:120]!r}")
    return name


# the stored name save_upload gives a file (uuid4 hex + suffix), with or without the reference prefix
_STORED = re.compile(r"(?:upload:)?\b([0-9a-f]{32}\.(?:csv|jsonl|parquet))\b")


def upload_display_names(settings: Settings, text: str) -> str:
    """`text` with every uploaded dataset's stored name (`upload:<hex>.csv` or `<hex>.csv`)
    replaced by the file name it was uploaded as (a name with no recorded upload stays)."""
    stored = sorted(set(_STORED.findall(text)))
    if not stored:
        return text
    with db.transaction(settings.database_url) as s:
        names = dict(s.execute(select(db.Upload.stored_name, db.Upload.name)
                               .where(db.Upload.stored_name.in_(stored))).all())
    return _STORED.sub(lambda m: names.get(m.group(1), m.group(0)), text)


def check_local_path(settings: Settings, path: str) -> Path:
    """A plain dataset path, resolved; it must lie under the allowed data roots."""
    if "\x00" in path or len(path) > 4096:
        raise ValueError(f"dataset.path: {path[:80]!r} is not a valid path")
    p = Path(path).expanduser().resolve()
    roots = [Path(r).resolve() for r in settings.data_roots]
    if not any(p == r or r in p.parents for r in roots):
        raise ValueError(f"dataset.path: {path!r} is outside the allowed data directories "
                         f"({', '.join(map(str, roots))}); upload the file through the studio or set STUDIO_DATA_ROOTS")
    return p


def check_dataset_path(settings: Settings, path: str) -> None:
    """The rules for a dataset path without reading it: an upload reference must
    name a recorded upload, a plain path must lie under the data roots."""
    name = upload_name(path)
    if name is None:
        check_local_path(settings, path)
        return
    with db.transaction(settings.database_url) as s:
        known = s.scalar(select(db.Upload.id).where(db.Upload.stored_name == name))
    if not known:
        raise LookupError(f"dataset.path: no uploaded dataset {path!r}; upload it first (POST /api/datasets)")


def resolve_dataset_path(settings: Settings, path: str) -> Path:
    """A local file to read for `path`: an upload is fetched from the artifact store
    (verified by sha256, cached by it on this machine); a plain path is checked."""
    from .store import get_store

    name = upload_name(path)
    if name is None:
        return check_local_path(settings, path)
    with db.transaction(settings.database_url) as s:
        up = s.scalar(select(db.Upload).where(db.Upload.stored_name == name))
        key, sha = (up.key, up.sha256) if up else (None, None)
    if up is None:
        raise ValueError(f"dataset.path: no uploaded dataset {path!r}")
    if key is None:
        raise ValueError(f"dataset.path: uploaded dataset {path!r} has no object in the artifact store (its file "
                         f"was missing when the database was upgraded); upload it again")
    return get_store(settings).get_file(key, sha, suffix=Path(name).suffix)


def publish_upload(settings: Settings, local: str | Path, stored_name: str):
    """Put a checked upload into the artifact store; returns the Stored record."""
    from .store import get_store

    return get_store(settings).put_file(f"datasets/{stored_name}", local)
