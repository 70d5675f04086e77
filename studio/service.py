"""What the UI and the REST API do, in one place: submit, list, inspect, cancel
runs; estimates; dataset uploads. Everything reads the database, never a worker."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import delete, func, select

from workers import db
from workers.settings import Settings

from .checks import check_against_model, check_dataset_for_task, is_estimate_only, model_config_for
from .errors import InternalError, NotFound, SubmitError
from .run_files import forget_run_files

log = logging.getLogger("peft_studio.service")


# ------------------------------------------------------------------ validation and estimate

# what every "too large to upload" answer adds
LARGE_DATA_HINT = (" To train on larger data, put the file (or a directory of Parquet shards) in the artifact store"
                   " or under STUDIO_DATA_ROOTS on the workers, and give that path as dataset.path.")

def validate_config(cfg_dict: dict, settings: Optional[Settings] = None):
    """Parse a run config and check it against the model's structure (target modules
    exist) without loading weights: the model is built on the meta device.

    `settings` (default: from the environment) gives the allowed model roots and data
    roots: a local model directory or a dataset.path outside them is refused here, at
    submit time, not only later by the worker."""
    from engine.config import ConfigError, parse_run_config

    try:
        cfg = parse_run_config(cfg_dict)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    if settings is None:
        from workers.settings import load_settings
        settings = load_settings()
    # torch.manual_seed takes 64-bit seeds; a larger one failed inside the meta-device
    # check with "Overflow when unpacking long long" (no field named)
    if not -2**63 <= cfg.training.seed < 2**64:
        raise SubmitError("training.seed: must fit in 64 bits")
    if is_estimate_only(cfg.model):
        raise SubmitError(f"model: {cfg.model!r} is in the estimator's catalog only: its weights are not on this "
                          f"machine, so it can be estimated but not trained here; pick a bundled model or give a "
                          f"local model directory")
    for field, path in cfg.dataset.file_paths():    # a multi-task run: every task's files
        check_dataset_path(settings, path, field)
    check_against_model(cfg, settings)
    check_dataset_for_task(cfg, settings)
    return cfg


def check_dataset_path(settings: Settings, path: str, field: str) -> None:
    """The worker's rules for a dataset path (an upload reference, or a file under
    STUDIO_DATA_ROOTS), applied at submit time; a missing upload is refused too."""
    from workers.datasets import check_dataset_path as check

    try:
        check(settings, path)
    except (ValueError, LookupError, OSError) as e:
        msg = str(e)
        msg = msg if msg.startswith("dataset.path: ") else f"dataset.path: {path[:200]!r} is not a valid path ({msg})"
        raise SubmitError(msg.replace("dataset.path: ", f"{field}: ", 1)) from None


def estimate_for(cfg, settings: Optional[Settings] = None) -> dict:
    """The memory estimate stored with a run, per device (world size, strategy and
    optimizer of the run config). A model the estimator cannot place is a
    SubmitError: without an estimate no worker could be checked for room."""
    from engine.estimator import estimate_run
    from engine.models import ModelLoadError

    model = cfg.model
    try:
        conf = model_config_for(cfg.model, settings)
    except ModelLoadError as e:
        raise SubmitError(str(e)) from None
    if conf is not None and conf.get("model_type"):
        model = conf
    try:   # for a CUDA device until a worker claims the run (engine.estimator.runs): auto is bf16 there
        est = estimate_run(cfg, model, device="cuda")
    except (ValueError, NotImplementedError) as e:   # the config asks what the estimator cannot answer
        raise SubmitError(f"estimate: cannot estimate the memory of {cfg.model!r} with {cfg.method.name!r} "
                          f"({e}); without an estimate no worker can be checked for room") from None
    except Exception as e:   # the estimator broke: our fault, reported as such (500), never skipped
        raise InternalError(f"estimate: the estimator failed on {cfg.model!r} with {cfg.method.name!r} "
                            f"({type(e).__name__}: {e}); this is a fault in the studio, not in the config; "
                            f"without an estimate no worker can be checked for room") from e
    answer = est.to_json()
    total = answer["rows"]["total"]
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise InternalError(f"estimate: the estimator gave {total!r} bytes for {cfg.model!r} with "
                            f"{cfg.method.name!r}; this is a fault in the studio, not in the config")
    return answer


# ------------------------------------------------------------------ runs

def enqueue(settings: Settings, run_id: int, token: int = 0, priority: int = 0,
            estimate_bytes: Optional[int] = None, world_size: int = 1) -> None:
    from workers.queue import enqueue_new

    enqueue_new(settings, run_id, token, priority, estimate_bytes, world_size)


def _gib(b: Optional[int]) -> str:
    return "unknown memory" if not b else f"{b / 1024 ** 3:.2f} GiB"


def check_capacity(settings: Settings, estimate_bytes: int, world_size: int = 1) -> None:
    """Refuse a run that no connected worker can hold (with no worker connected yet,
    the run waits for one). `estimate_bytes` is per device; a run of `world_size` > 1
    needs a worker with that many devices of that much memory each, or a worker
    connected to a Ray cluster (which places the ranks itself). There is no check
    without an estimate: a missing one is an InternalError, not a pass."""
    if isinstance(estimate_bytes, bool) or not isinstance(estimate_bytes, int) or estimate_bytes <= 0:
        raise InternalError(f"estimate: {estimate_bytes!r} is not a memory estimate in bytes; the capacity "
                            f"check cannot run without one")
    workers = list_workers(settings)
    if not workers:
        return
    if world_size > 1:
        if any(w.get("ray_address") for w in workers):
            return
        def fits(w) -> bool:
            mem = sorted((m or 0 for m in (w.get("device_memory") or [])), reverse=True)
            return len(mem) >= world_size and mem[world_size - 1] >= estimate_bytes
        if any(fits(w) for w in workers):
            return
        best = max(workers, key=lambda w: ((w.get("devices") or 1), max(w.get("device_memory") or [0])))
        n = best.get("devices") or 1
        raise SubmitError(
            f"training.distributed.world_size: this run needs {world_size} devices with {_gib(estimate_bytes)} "
            f"each, but the largest connected worker, {best['name']}, has {n} device{'s' if n != 1 else ''} "
            f"of {_gib(max(best.get('device_memory') or [0]))} ({best['device']}); lower world_size, use "
            f"strategy 'fsdp', connect a worker with more devices (STUDIO_WORKER_DEVICES), or set "
            f"STUDIO_RAY_ADDRESS on a worker to use a Ray cluster")
    workers = [w for w in workers if w.get("total_memory")]
    if not workers:
        return
    biggest = max(workers, key=lambda w: w["total_memory"])
    if biggest["total_memory"] < estimate_bytes:
        gib = 1024 ** 3
        raise SubmitError(
            f"memory: this run needs an estimated {estimate_bytes / gib:.2f} GiB, but the largest connected worker, "
            f"{biggest['name']} ({biggest['device']}), has {biggest['total_memory'] / gib:.2f} GiB; lower "
            f"training.batch_size or training.max_seq_len, pick a smaller rank or a quantized method, or connect "
            f"a bigger worker")


def submit_run(settings: Settings, cfg_dict: dict, *, owner: Optional[str] = None, priority: int = 0) -> int:
    """Validate, record as `queued`, and put on the queue. Returns the run id."""
    cfg = validate_config(cfg_dict, settings)
    est = estimate_for(cfg, settings)
    est_bytes = est["rows"]["total"]
    world = cfg.training.distributed.world_size
    check_capacity(settings, est_bytes, world)
    with db.transaction(settings.database_url) as s:
        run = db.create_run(s, cfg.to_dict(), owner=owner, estimate=est, estimated_peak=est_bytes,
                            priority=priority)
        run_id = run.id
    try:
        enqueue(settings, run_id, 0, priority, est_bytes, world)
    except Exception as e:
        with db.transaction(settings.database_url) as s:
            s.execute(db.update(db.Run).where(db.Run.id == run_id, db.Run.status == "queued").values(
                status="failed", error=f"could not reach the queue: {type(e).__name__}: {e}",
                finished_at=db.utcnow()))
        raise SubmitError(f"broker: could not queue run {run_id}: {e}") from None
    log.info("run %s queued (%s, %s)", run_id, cfg.model, cfg.method.name)
    return run_id


def list_runs(settings: Settings, *, owner: Optional[str] = None, status: Optional[str] = None,
              limit: int = 500) -> list[dict]:
    with db.transaction(settings.database_url) as s:
        q = select(db.Run).order_by(db.Run.id.desc()).limit(limit)
        if owner is not None:
            q = q.where(db.Run.owner == owner)
        if status:
            q = q.where(db.Run.status == status)
        return [db.run_to_dict(r, with_config=True) for r in s.scalars(q)]


def get_runs(settings: Settings, ids: list[int]) -> list[dict]:
    """`get_run` for each of `ids` that exists, in that order (unknown ids are skipped)."""
    runs = []
    for rid in ids:
        try:
            runs.append(get_run(settings, rid))
        except NotFound:
            continue
    return runs


def get_run(settings: Settings, run_id: int) -> dict:
    """A run's row, its adapter's metadata (`adapter`: size, sha256, files, key) and
    `resumed_from_step` (the checkpoint step the current attempt started from, or None),
    `world_size` (ranks) and `ranks` (where each rank runs: [{rank, host, device, pid}])."""
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        d = db.run_to_dict(run)
        from workers.queue import world_size_of
        d["world_size"] = world_size_of(run.config)
        d["ranks"] = d.get("ranks") or []
        # the run's log of warnings [{at, message}] and where trackers mirror it {mlflow|tensorboard|wandb: {...}}
        d["warnings"], d["tracking"] = d.get("warnings") or [], d.get("tracking") or {}
        ad = s.scalar(select(db.Adapter).where(db.Adapter.run_id == run_id))
        d["adapter"] = {"size": ad.size, "sha256": ad.sha256, "files": ad.files, "key": ad.key} if ad else None
        return d


def get_metrics(settings: Settings, run_id: int, after_step: int = 0) -> list[dict]:
    with db.transaction(settings.database_url) as s:
        if s.get(db.Run, run_id) is None:
            raise NotFound(f"run {run_id} not found")
        rows = s.scalars(select(db.Metric).where(db.Metric.run_id == run_id, db.Metric.step > after_step)
                         .order_by(db.Metric.step))
        return [{"step": m.step, "loss": m.loss, "lr": m.lr, "tokens_per_s": m.tokens_per_s,
                 "elapsed_s": m.elapsed_s, "eta_s": m.eta_s, "epoch": m.epoch, "eval": m.eval} for m in rows]


def adapter_object(settings: Settings, run_id: int) -> tuple[str, str, int, str]:
    """(key, sha256, size, download name) of a run's adapter zip in the artifact store."""
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        ad = s.scalar(select(db.Adapter).where(db.Adapter.run_id == run_id))
        if ad is None:
            raise NotFound(f"run {run_id} has no adapter (status {run.status})")
        return ad.key, ad.sha256, ad.size, safe_filename(f"{run.name}-run{run.id}-{run.method}.zip")


def adapter_file(settings: Settings, run_id: int) -> tuple[Path, str]:
    """A local, sha256-verified copy of a run's adapter zip (this machine's cache of
    the artifact store) and its download name. Raises workers.store.ArtifactCorrupt
    for bytes changed in the store."""
    from workers.store import get_store

    key, sha, _size, name = adapter_object(settings, run_id)
    return get_store(settings).get_file(key, sha, suffix=".zip"), name


def get_adapter(settings: Settings, run_id: int) -> tuple[bytes, str]:
    """A run's adapter zip as bytes (small adapters; stream adapter_file for big ones)."""
    path, name = adapter_file(settings, run_id)
    return path.read_bytes(), name


def cancel_run(settings: Settings, run_id: int) -> str:
    with db.transaction(settings.database_url) as s:
        st = db.request_cancel(s, run_id)
    if st is None:
        raise NotFound(f"run {run_id} not found")
    return st


def not_resumable(run: dict) -> Optional[str]:
    """Why run `run` (a run dict) cannot be resumed ('is running; ...'), or None when it can: only failed or
    cancelled runs can, and not one that failed on its config (the worker records
    results.failed_on = 'config': a missing column or model fails the same way again)."""
    if run.get("status") not in ("failed", "cancelled"):
        return f"is {run.get('status')}; only failed or cancelled runs can be resumed"
    if (run.get("results") or {}).get("failed_on") == "config":
        return ("failed on its config, so running it again would fail the same way; fix the config "
                "(Clone into Launch) and launch it as a new run")
    return None


def resume_run(settings: Settings, run_id: int) -> dict:
    """Queue a failed or cancelled run again; it continues from its last checkpoint
    (or starts over when it has none)."""
    from workers.checkpoints import checkpoint_step
    from workers.queue import requeue_run

    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        why = not_resumable(db.run_to_dict(run))
    if why:
        raise SubmitError(f"run {run_id} {why}")
    step = checkpoint_step(settings, run_id)
    token = requeue_run(settings, run_id, ("failed", "cancelled"),
                        reason=f"resumed from step {step}" if step else "restarted (no checkpoint)")
    if token is None:
        raise SubmitError(f"run {run_id} changed state meanwhile; try again")
    return {"id": run_id, "status": "queued", "from_step": step or 0}


def set_priority(settings: Settings, run_id: int, priority: int) -> dict:
    """Move a queued run up (higher priority) or down; it is re-sent to the queue
    with its new priority (the old message becomes a no-op)."""
    from workers.queue import send

    if not -5 <= priority <= 5:
        raise SubmitError("priority: must be between -5 (last) and 5 (first)")
    with db.transaction(settings.database_url) as s:
        res = s.execute(db.update(db.Run).where(db.Run.id == run_id, db.Run.status == "queued").values(
            priority=priority, queue_token=db.Run.queue_token + 1))
        if res.rowcount != 1:
            run = s.get(db.Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            raise SubmitError(f"run {run_id} is {run.status}; only queued runs can be reprioritized")
        run = s.get(db.Run, run_id)
        token, est, config = run.queue_token, run.estimated_peak_bytes, run.config
    from workers.queue import world_size_of

    send(settings, run_id, token, priority, est, world_size_of(config))
    return {"id": run_id, "priority": priority}


def delete_run(settings: Settings, run_id: int) -> None:
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        if run.status == "running":
            raise SubmitError(f"run {run_id} is running; cancel it first")
        keys = [k for k in s.scalars(select(db.Adapter.key).where(db.Adapter.run_id == run_id))]
        keys += [k for k in s.scalars(select(db.Artifact.key).where(db.Artifact.run_id == run_id))]
        s.execute(delete(db.Metric).where(db.Metric.run_id == run_id))
        s.execute(delete(db.Adapter).where(db.Adapter.run_id == run_id))
        s.execute(delete(db.Artifact).where(db.Artifact.run_id == run_id))
        s.delete(run)
    from workers.store import StoreError, get_store

    for key in keys:   # the rows are gone first: no run points at a deleted object
        try:
            get_store(settings).delete(key)
        except StoreError as e:
            log.warning("run %s deleted, but its object could not be removed: %s", run_id, e)
    forget_run_files(settings, run_id)   # what this machine derived from the run (GGUF files)


def list_workers(settings: Settings) -> list[dict]:
    """Live workers: device and memory, `concurrency` (runs it may hold at once), `running`
    (ids of the runs it is running, from the runs table) and `reserved_memory` (bytes its
    packed runs hold; null on a one-run worker)."""
    with db.transaction(settings.database_url) as s:
        live = db.live_workers(s, max(30.0, 3 * settings.heartbeat_interval_s))
        running: dict[str, list[int]] = {}
        if live:
            for rid, host in s.execute(select(db.Run.id, db.Run.worker_host).where(
                    db.Run.status == "running", db.Run.worker_host.in_([w.name for w in live]))
                    .order_by(db.Run.id)):
                running.setdefault(host, []).append(rid)
        return [{"name": w.name, "host": w.host, "pid": w.pid, "device": w.device, "total_memory": w.total_memory,
                 "free_memory": w.free_memory, "queue": w.queue, "devices": w.devices or 1,
                 "device_memory": w.device_memory or [w.total_memory], "ray_address": w.ray_address,
                 "concurrency": w.concurrency or 1, "running": running.get(w.name, []),
                 "reserved_memory": w.reserved_memory, "heartbeat_at": w.heartbeat_at.isoformat() + "Z"}
                for w in live]


# ------------------------------------------------------------------ uploads

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
ALLOWED_UPLOADS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"PK\x03\x04", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")


def safe_filename(name: str) -> str:
    """A display-safe file name: no directories, no odd characters, bounded length."""
    base = os.path.basename(name.replace("\\", "/")) or "file"
    stem, dot, ext = _SAFE.sub("_", base).rpartition(".")
    if not dot:
        stem, ext = ext, ""
    # "日本.csv" keeps its type as "file.csv"; no leading dot (hidden files) or dot-dot
    stem, ext = stem.strip("._") or "file", ext.strip("._")
    base = f"{stem}.{ext}" if ext else stem
    if len(base) > 120:   # shorten the stem, keep the extension (the file type is read from it)
        stem, dot, ext = base.rpartition(".")
        base = f"{stem[:119 - len(ext)]}.{ext}" if dot and stem and len(ext) <= 10 else base[:120]
    return base


def sniff_upload(head: bytes, suffix: str) -> None:
    """Refuse by content, whatever the name says: pickles, archives / compressed files,
    a .parquet that is not Parquet, a text name on a Parquet or other binary file."""
    if head.startswith(PICKLE_MAGIC) or head.startswith(b"\x93NUMPY"):
        raise SubmitError("upload: the file is a Python pickle; pickles are never loaded")
    if suffix != ".parquet" and head.startswith(COMPRESSED_MAGIC):
        raise SubmitError("upload: the file is compressed or an archive; upload plain CSV, JSONL or Parquet")
    if suffix == ".parquet" and not head.startswith(b"PAR1"):
        raise SubmitError("upload: the file is named .parquet but is not a Parquet file")
    if suffix != ".parquet" and (head.startswith(b"PAR1") or b"\x00" in head):
        raise SubmitError(f"upload: the file is named {suffix} but is binary, not UTF-8 text")


def save_upload(settings: Settings, filename: str, source_path: str | Path, *, owner: Optional[str] = None) -> dict:
    """Validate that an uploaded dataset parses, put it into the artifact store under
    a generated name, and record it (key, size, sha256). Returns its description
    with preview rows. Nothing is kept in the studio's data dir."""
    from engine.data import DataError

    src = Path(source_path)
    if src.is_symlink() or not src.is_file():
        raise SubmitError("upload: symbolic links and special files are refused")
    # a client sends a plain file name; one with directories ("../../etc/passwd.csv",
    # "/abs/x.csv", "..\\x.csv") or control characters (NUL ...) is refused, not guessed at
    if (not filename or filename in (".", "..") or len(filename) > 255 or any(c in filename for c in "/\\")
            or any(ord(c) < 32 or ord(c) == 127 for c in filename)):
        raise SubmitError(f"upload: file name {filename[:100]!r} must be a plain file name "
                          f"(no directories, no control characters, at most 255 characters)")
    display = safe_filename(filename)
    suffix = Path(display).suffix.lower()
    if suffix not in ALLOWED_UPLOADS:
        raise SubmitError(f"upload: unsupported file type {suffix or '(none)'!r}; use .csv, .jsonl or .parquet")
    size = src.stat().st_size
    if size == 0:
        raise SubmitError("upload: the file is empty")
    if size > settings.max_upload_bytes:
        raise SubmitError(f"upload: {size / 2**20:.1f} MiB is over the limit of "
                          f"{settings.max_upload_bytes / 2**20:.0f} MiB (STUDIO_MAX_UPLOAD_MB).{LARGE_DATA_HINT}")
    with open(src, "rb") as f:
        sniff_upload(f.read(16), suffix)
    from workers.datasets import publish_upload
    from workers.store import get_store

    settings.ensure_dirs()
    stored = f"{uuid.uuid4().hex}{'.jsonl' if suffix == '.json' else suffix}"
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=settings.uploads_dir)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                out.write(chunk)
        try:
            rows = _read_checked(tmp, suffix, settings.max_upload_bytes)
        except DataError as e:
            raise SubmitError(str(e).replace(Path(tmp).name, display)) from None
        from engine.config import text_problem

        for c in rows[0]:   # a column no run config could name (engine.config's rule for text fields)
            if why := text_problem(str(c)):
                raise SubmitError(f"upload: column name {str(c)[:50]!r} {why}")
        obj = publish_upload(settings, tmp, stored)   # a StoreError names the store (the API: 503)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    columns = list(rows[0].keys())
    try:
        with db.transaction(settings.database_url) as s:
            up = db.Upload(name=display, stored_name=stored, key=obj.key, format=ALLOWED_UPLOADS[suffix],
                           size=obj.size, sha256=obj.sha256, rows=len(rows), columns=columns, owner=owner)
            s.add(up)
            s.flush()
            uid = up.id
    except BaseException:   # not recorded: no orphan object either
        get_store(settings).delete(obj.key)
        raise
    return {"id": uid, "name": display, "path": f"upload:{stored}", "rows": len(rows), "columns": columns,
            "preview": [{k: _short(v) for k, v in r.items()} for r in rows[:5]]}


def _read_checked(tmp: str, suffix: str, max_bytes: int) -> list[dict]:
    from engine.data import read_table

    # read_table picks the parser by suffix: give it a name with the right one
    link = tmp + (suffix if suffix != ".json" else ".jsonl")
    os.link(tmp, link)
    try:
        return read_table(link, max_bytes=max_bytes)
    finally:
        os.unlink(link)


def _short(v: Any, n: int = 200) -> Any:
    return (v[:n] + "…") if isinstance(v, str) and len(v) > n else v


def list_uploads(settings: Settings, owner: Optional[str] = None) -> list[dict]:
    with db.transaction(settings.database_url) as s:
        q = select(db.Upload).order_by(db.Upload.id.desc())
        if owner is not None:
            q = q.where(db.Upload.owner == owner)
        return [{"id": u.id, "name": u.name, "path": f"upload:{u.stored_name}", "rows": u.rows,
                 "columns": u.columns, "size": u.size} for u in s.scalars(q)]


def count_runs(settings: Settings) -> dict:
    with db.transaction(settings.database_url) as s:
        return dict(s.execute(select(db.Run.status, func.count()).group_by(db.Run.status)).all())
