"""Optuna's storage for studies: the studio's own database (SQLite or PostgreSQL),
opened on the tables that migration 0010 created.

Why not let Optuna manage its tables: Optuna's RDBStorage keeps its schema version in
Alembic's default table, `alembic_version`, which is ours too. Left to itself on a fresh
database it stamps that table with its own revision (then `peft-studio db upgrade`
fails: unknown revision), and on our database it reads our revision ('0010') and refuses
to open ("no longer compatible with the table schema"). Pointing it at a version table
of its own is not offered by Optuna, and a second database or schema would break "one
database holds everything" (one backup, one URL, SQLite included). So migration 0010
creates Optuna's tables from Optuna's definitions at the pinned version and writes its
`version_info` row; here the storage opens with `skip_table_creation` and
`skip_compatibility_check`, so Optuna never reads or writes `alembic_version`, and
`check_schema` does the compatibility check Optuna would: the schema version in the
database must be the running Optuna's (else a clear error: a new migration of ours is
needed before that Optuna can be used)."""

from __future__ import annotations

import threading
from typing import Any

from workers.settings import Settings


class StudyStorageError(RuntimeError):
    """The database is not ready for studies (not migrated, or migrated for another Optuna)."""


_LOCK = threading.Lock()
_STORAGES: dict[tuple[int, str], Any] = {}


def check_schema(url: str) -> None:
    """Raise StudyStorageError unless Optuna's tables exist with the running Optuna's schema."""
    from optuna.storages._rdb import models
    from sqlalchemy import inspect, select

    from workers import db

    eng = db.get_engine(url)
    with eng.connect() as conn:
        if "version_info" not in inspect(conn).get_table_names():
            raise StudyStorageError("studies: the database has no study tables; run `peft-studio db upgrade`")
        row = conn.execute(select(models.VersionInfoModel.__table__)).first()
    if row is None or row.schema_version != models.SCHEMA_VERSION:
        import optuna

        have = None if row is None else f"{row.schema_version} (written by optuna {row.library_version})"
        raise StudyStorageError(
            f"studies: the database holds Optuna schema {have}, but optuna {optuna.__version__} needs schema "
            f"{models.SCHEMA_VERSION}; install the optuna version pinned in pyproject.toml, or add a migration "
            f"that brings Optuna's tables to the new schema")


def get_storage(settings: Settings):
    """One RDBStorage per database URL per process (Optuna's storage is thread-safe)."""
    import os

    from optuna.storages import RDBStorage

    url = settings.database_url
    key = (os.getpid(), url)
    with _LOCK:
        st = _STORAGES.get(key)
        if st is None:
            check_schema(url)
            kw: dict[str, Any] = {"pool_pre_ping": True}
            if url.startswith("sqlite"):
                kw["connect_args"] = {"timeout": 30}
            st = RDBStorage(url, engine_kwargs=kw, skip_compatibility_check=True, skip_table_creation=True)
            _STORAGES[key] = st
        return st


def forget_storages() -> None:
    """Drop this process's cached storages (tests that delete their database)."""
    with _LOCK:
        for st in _STORAGES.values():
            try:
                st.engine.dispose()
            except Exception:
                pass
        _STORAGES.clear()
