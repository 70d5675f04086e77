"""Settings from the environment (see README, 'Configuration').

STUDIO_DATA_DIR       data directory (default ~/.peft-studio)
STUDIO_DATABASE_URL   default: SQLite file in the data dir; postgresql+psycopg://... to scale out
STUDIO_BROKER_URL     default: embedded (kombu filesystem transport in the data dir); redis://... to scale out
STUDIO_MODEL_ROOTS    directories local models may be loaded from (os.pathsep-separated;
                      default: the data dir and the home directory)
STUDIO_DATA_ROOTS     directories a run config's dataset.path may point into (default: the data dir);
                      uploads are referenced as upload:<name>
STUDIO_MAX_UPLOAD_MB  largest accepted dataset upload (default 200)
STUDIO_HEARTBEAT_TIMEOUT  seconds without a heartbeat before a running run is failed (default 45)
STUDIO_QUEUE          the Celery queue name (default "studio")
STUDIO_ARTIFACT_URL   the artifact store every machine reaches (default file://<data dir>/artifacts;
                      s3://bucket/prefix, or file:///mnt/shared/... for a shared mount)
STUDIO_S3_ENDPOINT_URL  an S3-compatible endpoint (MinIO, Ceph, ...); credentials come from the
                      standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)
STUDIO_WORKER_CONCURRENCY  how many runs one worker holds at once while their memory budgets fit its
                      memory (default: 4 on a CUDA worker, 1 on a CPU worker; 1 = one run at a time
                      in the worker's own process). See docs/packing.md
STUDIO_WORKER_MEMORY_MARGIN  a packed run may use its estimate times (1 + margin) before it is
                      stopped as out of its memory budget (default 0.2)
STUDIO_WORKER_PROCESS_MB  memory each packed run's process needs beyond its estimate (interpreter,
                      libraries, tokenizer, data), reserved with it (default on CPU: the largest
                      baseline the worker's run processes reported, 640 before the first; 0 on CUDA,
                      where the estimate is of device memory)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.paths import default_data_dir


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    v = os.environ.get(name)
    return v if v not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: Optional[str]
    model_roots: tuple[Path, ...]
    data_roots: tuple[Path, ...]
    max_upload_bytes: int
    heartbeat_timeout_s: float
    heartbeat_interval_s: float
    queue: str
    artifact_url: str = ""
    s3_endpoint_url: Optional[str] = None
    worker_concurrency: Optional[int] = None        # None: by device kind (workers.packing)
    worker_memory_margin: float = 0.2
    worker_process_mb: Optional[float] = None       # None: by device kind (workers.packing)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def models_dir(self) -> Path:
        cache = os.environ.get("STUDIO_MODEL_CACHE")
        return Path(cache).expanduser() if cache else self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        """This machine's copies of artifacts it downloaded from the store, by sha256."""
        return self.data_dir / "cache" / "artifacts"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.uploads_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            (self.broker_dir / "queue").mkdir(parents=True, exist_ok=True)
            (self.broker_dir / "processed").mkdir(parents=True, exist_ok=True)


def load_settings() -> Settings:
    data_dir = default_data_dir()
    db = _env("STUDIO_DATABASE_URL", f"sqlite:///{(data_dir / 'studio.db').as_posix()}")
    broker = _env("STUDIO_BROKER_URL")
    if broker in ("embedded", "filesystem"):
        broker = None
    roots_env = _env("STUDIO_MODEL_ROOTS")
    roots = tuple(Path(p).expanduser() for p in roots_env.split(os.pathsep) if p) if roots_env \
        else (data_dir, Path(os.path.expanduser("~")))
    droots_env = _env("STUDIO_DATA_ROOTS")
    droots = tuple(Path(p).expanduser() for p in droots_env.split(os.pathsep) if p) if droots_env else (data_dir,)
    return Settings(
        data_dir=data_dir,
        database_url=db,
        broker_url=broker,
        model_roots=roots,
        data_roots=droots,
        max_upload_bytes=int(float(_env("STUDIO_MAX_UPLOAD_MB", "200")) * 1024 * 1024),
        heartbeat_timeout_s=float(_env("STUDIO_HEARTBEAT_TIMEOUT", "45")),
        heartbeat_interval_s=float(_env("STUDIO_HEARTBEAT_INTERVAL", "5")),
        queue=_env("STUDIO_QUEUE", "studio"),
        artifact_url=_env("STUDIO_ARTIFACT_URL", (data_dir / "artifacts").resolve().as_uri()),
        s3_endpoint_url=_env("STUDIO_S3_ENDPOINT_URL"),
        worker_concurrency=_whole("STUDIO_WORKER_CONCURRENCY", lowest=1),
        worker_memory_margin=_number("STUDIO_WORKER_MEMORY_MARGIN", 0.2, lowest=0.0, highest=10.0),
        worker_process_mb=_number("STUDIO_WORKER_PROCESS_MB", None, lowest=0.0, highest=1 << 30),
    )


def _whole(name: str, *, lowest: int) -> Optional[int]:
    raw = _env(name)
    if raw is None:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if v < lowest:
        raise ValueError(f"{name}={raw!r} must be at least {lowest}")
    return v


def _number(name: str, default: Optional[float], *, lowest: float, highest: float) -> Optional[float]:
    raw = _env(name)
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not lowest <= v <= highest:   # also refuses nan
        raise ValueError(f"{name}={raw!r} must be between {lowest:g} and {highest:g}")
    return v


def redact_url(url: str) -> str:
    """A URL with its password replaced, for logs and the UI."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
