"""The database layer: SQLAlchemy 2 typed ORM models and the transactions that
move a run through its states. Shared by the studio and the workers; imports no
web framework.

Run states: queued -> running -> succeeded | failed | cancelled
(queued -> cancelled directly). Every transition is a conditional UPDATE in one
transaction, so two processes can never both start, or both finish, a run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, create_engine, event, func, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    config: Mapped[dict] = mapped_column(JSON)
    model: Mapped[str] = mapped_column(String(500))
    method: Mapped[str] = mapped_column(String(40))
    rank: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    task: Mapped[str] = mapped_column(String(20))
    owner: Mapped[Optional[str]] = mapped_column(String(100), nullable=True, index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    worker_host: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    worker_pid: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    device: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Incremented whenever the run is (re)queued; a queue message carries the token it
    # was sent with, and only a message with the current token may start the run.
    queue_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    estimate: Mapped[Optional[dict]] = mapped_column(JSON, nullable=True)
    estimated_peak_bytes: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    measured_peak_bytes: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    memory_kind: Mapped[Optional[str]] = mapped_column(String(40), nullable=True)
    n_params: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    n_trainable: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    max_steps: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    final_loss: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    metric_name: Mapped[Optional[str]] = mapped_column(String(40), nullable=True)
    best_metric: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    tokens_per_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    duration_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    results: Mapped[Optional[dict]] = mapped_column(JSON, nullable=True)
    # the checkpoint step the current attempt started from (None: it started fresh)
    resumed_from_step: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # where each rank of a distributed run runs: [{rank, host, device, pid}, ...] (None: one process)
    ranks: Mapped[Optional[list]] = mapped_column(JSON, nullable=True)
    # what a running run is doing before its first step ("preparing data: 1.2M / 2.8M rows (train)")
    phase: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    # the run's log of problems that did not fail it: [{"at": iso time, "message": str}] (add_run_warning)
    warnings: Mapped[Optional[list]] = mapped_column(JSON, nullable=True)
    # where the run is mirrored (workers.tracking): {"mlflow": {run_id, experiment_id, uri},
    # "tensorboard": {logdir}, "wandb": {run_id, project, mode, dir}} (set_run_tracking)
    tracking: Mapped[Optional[dict]] = mapped_column(JSON, nullable=True)

    metrics: Mapped[list["Metric"]] = relationship(back_populates="run", cascade="all, delete-orphan",
                                                   passive_deletes=True)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_metrics_run_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    lr: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    tokens_per_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    elapsed_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    eta_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    epoch: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    eval: Mapped[Optional[dict]] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    run: Mapped[Run] = relationship(back_populates="metrics")


class Adapter(Base):
    """A run's trained adapter (or full / top-k weights): a zip in the artifact store."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), unique=True, index=True)
    key: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Upload(Base):
    """A dataset file uploaded through the studio; stored under a generated name."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))        # sanitized original name, display only
    stored_name: Mapped[str] = mapped_column(String(100), unique=True)
    # its object in the artifact store (None: an upload whose file was missing at the upgrade)
    key: Mapped[Optional[str]] = mapped_column(String(500), nullable=True)
    format: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list] = mapped_column(JSON)
    owner: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Artifact(Base):
    """Another object of a run in the artifact store: its latest checkpoint
    (kind "checkpoint", with the step) or a merged model (kind "merged")."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("key", name="uq_artifacts_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    key: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    step: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class WorkerRow(Base):
    """A worker's last report of itself (device and memory), by heartbeat."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(100))
    device: Mapped[str] = mapped_column(String(200))
    total_memory: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    free_memory: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    # how many ranks of a distributed run it hosts, and each device's memory in bytes
    devices: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    device_memory: Mapped[Optional[list]] = mapped_column(JSON, nullable=True)
    # the Ray cluster it submits distributed runs to (STUDIO_RAY_ADDRESS), if any
    ray_address: Mapped[Optional[str]] = mapped_column(String(500), nullable=True)
    # runs it may hold at once, and the bytes reserved for those it holds (workers.packing; migration 0007)
    concurrency: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    reserved_memory: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class BenchmarkJob(Base):
    """A queued lm-evaluation-harness job (workers.benchmarks) on a finished run, or on a
    base model alone (run_id None: `model`, with `seed` for a random test model).
    States as a run's: queued -> running -> succeeded | failed (queued -> cancelled)."""

    __tablename__ = "benchmark_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=True,
                                                  index=True)
    model: Mapped[str] = mapped_column(String(500))
    seed: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    owner: Mapped[Optional[str]] = mapped_column(String(100), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    # harness task names; user tasks ([{"name", "config"}], safe YAML already checked) beside them
    tasks: Mapped[list] = mapped_column(JSON)
    user_tasks: Mapped[Optional[list]] = mapped_column(JSON, nullable=True)
    limit: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    num_fewshot: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    queue_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    phase: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    worker_host: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    worker_pid: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)


class BenchmarkResult(Base):
    """One task's scores from one benchmark job: the harness's metrics with their
    standard errors ({name: {"value", "stderr", "higher_is_better"}}), the task version,
    the number of documents scored and the limit it ran with."""

    __tablename__ = "benchmark_results"
    __table_args__ = (UniqueConstraint("job_id", "task", name="uq_benchmark_results_job_task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("benchmark_jobs.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=True,
                                                  index=True)
    model: Mapped[str] = mapped_column(String(500))
    task: Mapped[str] = mapped_column(String(200))
    version: Mapped[Optional[str]] = mapped_column(String(40), nullable=True)
    n_samples: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    n_total: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    limit: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class StudyRow(Base):
    """A study (studio.studies): one search per method within one budget. Optuna's own
    tables (migration 0010) hold the trials' parameters and values; this row holds the
    request and the study's state. Not "studies": that is Optuna's table."""

    __tablename__ = "studio_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[Optional[str]] = mapped_column(String(100), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="running")
    spec: Mapped[dict] = mapped_column(JSON)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    # the driver holding the study (one advance at a time across processes) and until when
    lease_owner: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    lease_until: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)


class StudyTrialRow(Base):
    """One trial of a study: its Optuna trial (by number within the method's Optuna study)
    and the run it launched (None: not launched, `reason` says why)."""

    __tablename__ = "studio_study_trials"
    __table_args__ = (UniqueConstraint("study_id", "arm", "number", name="uq_study_trials_arm_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studio_studies.id", ondelete="CASCADE"), index=True)
    arm: Mapped[str] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(40))
    number: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), nullable=True,
                                                  index=True)
    params: Mapped[dict] = mapped_column(JSON)
    # launching | running | completed | pruned | failed | not_launched | cancelled
    state: Mapped[str] = mapped_column(String(16), default="launching")
    value: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    # the evaluation steps reported to Optuna as intermediate values (pruning history)
    curve: Mapped[Optional[list]] = mapped_column(JSON, nullable=True)
    pruned_at_step: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)


class ApiKey(Base):
    """A user's key for the OpenAI-compatible /v1 (and /api): only its sha256 is kept
    (workers.api_keys); `prefix` is the start of the key, shown so people can tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[Optional[str]] = mapped_column(String(100), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)


# ------------------------------------------------------------------ engine/session

_ENGINES: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def get_engine(url: str) -> Engine:
    """One Engine per URL per process; pool pre-ping so a restarted server is survived."""
    eng = _ENGINES.get(url)
    if eng is None or _ENGINES.get("__pid__") != os.getpid():
        if _ENGINES.get("__pid__") != os.getpid():
            _ENGINES.clear()
            _ENGINES["__pid__"] = os.getpid()   # type: ignore[assignment]
        kw: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kw.update(pool_size=5, max_overflow=10, pool_recycle=1800)
        eng = create_engine(url, **kw)
        if url.startswith("sqlite"):
            event.listen(eng, "connect", _sqlite_pragmas)
        _ENGINES[url] = eng
    return eng


def session_factory(url: str) -> sessionmaker:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    with session_factory(url)() as s, s.begin():
        yield s


def upgrade(url: str, revision: str = "head") -> None:
    """Alembic upgrade (the schema is only ever created by migrations)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def alembic_config(url: str):
    from pathlib import Path

    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


# ------------------------------------------------------------------ run transitions

def create_run(s: Session, config: dict, *, owner: Optional[str] = None, estimate: Optional[dict] = None,
               estimated_peak: Optional[int] = None, priority: int = 0) -> Run:
    method = config["method"]
    run = Run(name=config.get("name", "run"), status="queued", config=config, model=config["model"],
              method=method["name"], rank=method.get("r"), task=config.get("task", "classification"),
              owner=owner, estimate=estimate, estimated_peak_bytes=estimated_peak, priority=priority,
              max_steps=config.get("training", {}).get("max_steps"))
    s.add(run)
    s.flush()
    return run


def claim_run(s: Session, run_id: int, *, host: str, pid: int, device: str, token: Optional[int] = None) -> bool:
    """queued -> running, exactly once across all workers (and only for the message
    carrying the current queue token, when one is given)."""
    now = utcnow()
    cond = [Run.id == run_id, Run.status == "queued"]
    if token is not None:
        cond.append(Run.queue_token == token)
    res = s.execute(update(Run).where(*cond).values(
        status="running", started_at=now, heartbeat_at=now, worker_host=host, worker_pid=pid, device=device,
        attempts=Run.attempts + 1, error=None, resumed_from_step=None, ranks=None, phase=None))
    return res.rowcount == 1


def finish_run(s: Session, run_id: int, status: str, **values) -> bool:
    """running -> succeeded/failed/cancelled (only from running). The phase is cleared:
    a finished run is doing nothing (a failure's message is in `error`)."""
    assert status in FINISHED
    values.setdefault("phase", None)
    res = s.execute(update(Run).where(Run.id == run_id, Run.status == "running").values(
        status=status, finished_at=utcnow(), **values))
    return res.rowcount == 1


def requeue(s: Session, run_id: int, from_statuses=("failed", "cancelled", "running", "queued"),
            reason: Optional[str] = None) -> Optional[int]:
    """Put a run (back) in the queue with a new token; returns the token, or None if
    the run was not in one of `from_statuses`."""
    res = s.execute(update(Run).where(Run.id == run_id, Run.status.in_(from_statuses)).values(
        status="queued", queue_token=Run.queue_token + 1, finished_at=None, cancel_requested=False,
        error=reason, worker_host=None, worker_pid=None))
    if res.rowcount != 1:
        return None
    return s.execute(select(Run.queue_token).where(Run.id == run_id)).scalar()


def request_cancel(s: Session, run_id: int) -> Optional[str]:
    """Cancel a queued run at once, or ask a running one to stop. Returns the new
    status, or None if the run is unknown."""
    run = s.get(Run, run_id)
    if run is None:
        return None
    if run.status == "queued":
        s.execute(update(Run).where(Run.id == run_id, Run.status == "queued").values(
            status="cancelled", finished_at=utcnow(), cancel_requested=True))
    elif run.status == "running":
        s.execute(update(Run).where(Run.id == run_id).values(cancel_requested=True))
    s.flush()
    s.refresh(run)
    return run.status


def cancel_requested(s: Session, run_id: int) -> bool:
    return bool(s.execute(select(Run.cancel_requested).where(Run.id == run_id)).scalar())


def heartbeat(s: Session, run_id: int, **values) -> None:
    s.execute(update(Run).where(Run.id == run_id, Run.status == "running").values(heartbeat_at=utcnow(), **values))


def add_metric(url: str, run_id: int, row: dict) -> None:
    """Insert a metrics row; a duplicate (run, step) — a retried write — is ignored."""
    try:
        with transaction(url) as s:
            s.add(Metric(run_id=run_id, **row))
    except IntegrityError:
        pass


def reap_stale_runs(s: Session, timeout_s: float, *, host: Optional[str] = None,
                    reason: Optional[str] = None) -> list[tuple[int, str, Optional[int]]]:
    """Runs still `running` whose heartbeat is older than `timeout_s` (or every
    running run of `host` when timeout_s is 0) lost their worker. Each is requeued
    when its config allows retries left (training.retries), else marked failed.
    Returns (run id, "requeued" | "failed", new queue token)."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    q = select(Run.id, Run.worker_host, Run.heartbeat_at, Run.attempts, Run.config).where(Run.status == "running")
    if host is not None:
        q = q.where(Run.worker_host == host)
    if timeout_s > 0:
        q = q.where((Run.heartbeat_at < cutoff) | (Run.heartbeat_at.is_(None)))
    out = []
    for rid, whost, hb, attempts, config in s.execute(q).all():
        why = reason or (f"worker {whost} stopped sending heartbeats (last at {hb:%Y-%m-%d %H:%M:%S} UTC, "
                         f"timeout {timeout_s:.0f} s); it probably died")
        retries = int(((config or {}).get("training") or {}).get("retries", 0) or 0)
        if attempts <= retries:
            token = requeue(s, rid, ("running",), reason=f"requeued (attempt {attempts} of {retries + 1}): {why}")
            if token is not None:
                out.append((rid, "requeued", token))
        elif finish_run(s, rid, "failed", error=why):
            out.append((rid, "failed", None))
    return out


def upsert_worker(s: Session, name: str, **values) -> None:
    row = s.get(WorkerRow, name)
    if row is None:
        s.add(WorkerRow(name=name, **values))
    else:
        for k, v in values.items():
            setattr(row, k, v)
        row.heartbeat_at = utcnow()


def live_workers(s: Session, within_s: float) -> list[WorkerRow]:
    cutoff = utcnow() - dt.timedelta(seconds=within_s)
    return list(s.scalars(select(WorkerRow).where(WorkerRow.heartbeat_at >= cutoff)))


def store_adapter(s: Session, run_id: int, key: str, size: int, sha: str, files: list[str]) -> Optional[str]:
    """Record a run's adapter object; returns the key it replaced (to delete), if any."""
    existing = s.scalar(select(Adapter).where(Adapter.run_id == run_id))
    if existing:
        old = existing.key if existing.key != key else None
        existing.key, existing.size, existing.sha256, existing.files = key, size, sha, files
        existing.created_at = utcnow()
        return old
    s.add(Adapter(run_id=run_id, key=key, size=size, sha256=sha, files=files))
    return None


MAX_RUN_WARNINGS = 200


def _locked_run(s: Session, run_id: int) -> Optional[Run]:
    """The run row, locked for update where the database can (PostgreSQL); SQLite
    serializes writers itself."""
    return s.scalar(select(Run).where(Run.id == run_id).with_for_update())


def add_run_warning(s: Session, run_id: int, message: str) -> bool:
    """Append {"at", "message"} to the run's warnings in this transaction (the list is
    replaced, not mutated, so the JSON column is written; at most MAX_RUN_WARNINGS are
    kept, the newest). False if the run does not exist."""
    run = _locked_run(s, run_id)
    if run is None:
        return False
    entry = {"at": utcnow().replace(tzinfo=dt.timezone.utc).isoformat(), "message": str(message)[:2000]}
    run.warnings = (list(run.warnings or []) + [entry])[-MAX_RUN_WARNINGS:]
    return True


def set_run_tracking(s: Session, run_id: int, tracker: str, info: dict) -> bool:
    """Record where tracker `tracker` (mlflow, tensorboard, wandb) mirrors the run:
    merged into the run's `tracking` dict under that key. False if the run does not exist."""
    run = _locked_run(s, run_id)
    if run is None:
        return False
    run.tracking = {**(run.tracking or {}), tracker: json_safe(info)}
    return True


def run_to_dict(run: Run, *, with_config: bool = True) -> dict:
    d = {c.name: getattr(run, c.name) for c in Run.__table__.columns}
    for k, v in list(d.items()):
        if isinstance(v, dt.datetime):
            d[k] = v.replace(tzinfo=dt.timezone.utc).isoformat()
    if not with_config:
        d.pop("config")
    return d


def hostname() -> str:
    return socket.gethostname()


def json_safe(obj) -> Any:
    return json.loads(json.dumps(obj, default=str))
