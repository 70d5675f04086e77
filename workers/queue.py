"""Putting runs on the broker, and recovering the queue after a broker restart.

The database is the source of truth: a run is `queued` there before any message
is sent, and a message only names (run id, queue token). A lost message is
recovered by sending it again; a duplicate or stale one is a no-op, because only
the message with the run's current token can claim it."""

from __future__ import annotations

import logging
import uuid
from typing import Optional

from sqlalchemy import select

from . import db
from .settings import Settings

log = logging.getLogger("peft_studio.queue")
EPOCH_KEY = "peft_studio:broker_epoch"
_APPS: dict = {}


def celery_app(settings: Settings):
    key = (settings.broker_url, str(settings.data_dir), settings.queue)
    if key not in _APPS:
        from .celery_app import make_celery
        _APPS[key] = make_celery(settings)
    return _APPS[key]


# Memory classes (GiB). A worker with M GiB consumes the base queue and every class
# queue <= M; a run whose estimate is E goes to the smallest class >= E, so any
# worker that takes it can hold it.
MEMORY_CLASSES_GIB = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 141, 192, 256, 512, 1024)
GIB = 1024 ** 3


def queue_for_estimate(settings: Settings, estimate_bytes: Optional[int]) -> str:
    if not estimate_bytes:
        return settings.queue
    for g in MEMORY_CLASSES_GIB:
        if estimate_bytes <= g * GIB:
            return f"{settings.queue}.m{g}"
    return f"{settings.queue}.m{MEMORY_CLASSES_GIB[-1]}"


def worker_queues(settings: Settings, total_memory: Optional[int], devices: int = 1,
                  device_memory: Optional[list] = None, ray: bool = False) -> list[str]:
    """The queues a worker consumes: with `total_memory` bytes, one-process runs
    that fit; with `devices` devices of `device_memory` bytes each, runs of
    2..devices ranks whose per-device estimate fits on that many of its devices;
    with a Ray cluster (`ray`), every run of more than one rank (Ray places them)."""
    out = [settings.queue]
    if total_memory:
        out += [f"{settings.queue}.m{g}" for g in MEMORY_CLASSES_GIB if g * GIB <= total_memory]
    if ray:
        return out + [ray_queue(settings)]
    mem = sorted((m for m in (device_memory or []) if m), reverse=True)
    for n in range(2, devices + 1):
        out.append(f"{settings.queue}.d{n}")
        if len(mem) >= n:
            out += [f"{settings.queue}.d{n}.m{g}" for g in MEMORY_CLASSES_GIB if g * GIB <= mem[n - 1]]
    return out


def ray_queue(settings: Settings) -> str:
    return f"{settings.queue}.ray"


def queue_for_run(settings: Settings, estimate_bytes: Optional[int], world_size: int = 1,
                  ray: bool = False) -> str:
    """The queue of a run: by its (per-device) estimate and its number of ranks; a
    run of several ranks goes to the Ray queue when a Ray-connected worker is live."""
    if world_size <= 1:
        return queue_for_estimate(settings, estimate_bytes)
    if ray:
        return ray_queue(settings)
    base = f"{settings.queue}.d{int(world_size)}"
    if not estimate_bytes:
        return base
    for g in MEMORY_CLASSES_GIB:
        if estimate_bytes <= g * GIB:
            return f"{base}.m{g}"
    return f"{base}.m{MEMORY_CLASSES_GIB[-1]}"


def ray_worker_live(settings: Settings) -> bool:
    with db.transaction(settings.database_url) as s:
        return any(w.ray_address for w in db.live_workers(s, max(30.0, 3 * settings.heartbeat_interval_s)))


def world_size_of(config: Optional[dict]) -> int:
    try:
        return int((((config or {}).get("training") or {}).get("distributed") or {}).get("world_size", 1) or 1)
    except (TypeError, ValueError):
        return 1


def broker_priority(priority: int) -> int:
    """Studio priority (higher first, -5..5) to the broker's 0..9 (Redis: 0 first)."""
    return max(0, min(9, 5 - int(priority)))


def send(settings: Settings, run_id: int, token: int, priority: int = 0,
         estimate_bytes: Optional[int] = None, world_size: int = 1) -> None:
    ray = world_size > 1 and ray_worker_live(settings)
    celery_app(settings).send_task("studio.train_run", args=[int(run_id), int(token)],
                                   queue=queue_for_run(settings, estimate_bytes, world_size, ray),
                                   priority=broker_priority(priority))


def ensure_broker_epoch(settings: Settings) -> int:
    """With Redis: if the broker lost its data (restarted without persistence), send
    every queued run again. Returns how many were re-sent."""
    if settings.embedded_broker:
        return 0
    import redis

    r = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    try:
        if r.get(EPOCH_KEY) is not None:
            return 0
        # first sight of this broker (or it lost everything): claim the new epoch, then re-send
        if not r.set(EPOCH_KEY, uuid.uuid4().hex, nx=True):
            return 0
    finally:
        r.close()
    return resend_queued(settings, "the broker has no record of the queue (new or restarted)")


def resend_queued(settings: Settings, why: str) -> int:
    with db.transaction(settings.database_url) as s:
        rows = s.execute(select(db.Run.id, db.Run.queue_token, db.Run.priority, db.Run.estimated_peak_bytes,
                                db.Run.config).where(db.Run.status == "queued").order_by(db.Run.id)).all()
    for rid, token, prio, est, config in rows:
        send(settings, rid, token, prio, est, world_size_of(config))
    if rows:
        log.warning("re-sent %d queued run(s): %s", len(rows), why)
    return len(rows)


def enqueue_new(settings: Settings, run_id: int, token: int, priority: int = 0,
                estimate_bytes: Optional[int] = None, world_size: int = 1) -> None:
    """Send a freshly queued run, making sure the broker's epoch is set first."""
    try:
        ensure_broker_epoch(settings)
    except Exception as e:   # the send below reports a dead broker
        log.warning("broker epoch check failed: %s", e)
    send(settings, run_id, token, priority, estimate_bytes, world_size)


def requeue_run(settings: Settings, run_id: int, from_statuses, reason: Optional[str] = None) -> Optional[int]:
    with db.transaction(settings.database_url) as s:
        token = db.requeue(s, run_id, from_statuses, reason=reason)
        row = s.execute(select(db.Run.priority, db.Run.estimated_peak_bytes, db.Run.config)
                        .where(db.Run.id == run_id)).one()
    if token is not None:
        send(settings, run_id, token, row[0] or 0, row[1], world_size_of(row[2]))
    return token


def reap_and_requeue(settings: Settings, timeout_s: float, **kw) -> list[tuple[int, str, Optional[int]]]:
    """Fail or requeue runs whose worker died (see db.reap_stale_runs) and send the requeued ones;
    fail the benchmark jobs such a worker held (workers.benchmarks.reap_stale_benchmarks)."""
    from .benchmark_jobs import reap_stale_benchmarks

    with db.transaction(settings.database_url) as s:
        out = db.reap_stale_runs(s, timeout_s, **kw)
        for jid in reap_stale_benchmarks(s, timeout_s, **kw):
            log.warning("benchmark %s: worker lost, failed", jid)
        info = {rid: s.execute(select(db.Run.priority, db.Run.estimated_peak_bytes, db.Run.config)
                               .where(db.Run.id == rid)).one() for rid, _, _ in out}
    for rid, action, token in out:
        if action == "requeued":
            send(settings, rid, token, info[rid][0] or 0, info[rid][1], world_size_of(info[rid][2]))
        log.warning("run %s: worker lost, %s", rid, action)
    return out
