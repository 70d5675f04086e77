"""What the UI and the REST API do, in one place: submit, list, inspect, cancel
runs; estimates; dataset uploads. Everything reads the database, never a worker."""

from __future__ import annotations

import hashlib
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

log = logging.getLogger("peft_studio.service")


class SubmitError(ValueError):
    """A run that cannot be queued; the message names the field."""


class NotFound(LookupError):
    pass


# ------------------------------------------------------------------ validation and estimate

def validate_config(cfg_dict: dict):
    """Parse a run config and check it against the model's structure (target modules
    exist) without loading weights: the model is built on the meta device."""
    from engine.config import ConfigError, parse_run_config

    try:
        cfg = parse_run_config(cfg_dict)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    check_against_model(cfg)
    return cfg


def model_config_for(name: str, settings: Optional[Settings] = None) -> Optional[dict]:
    """config.json of a model without weights: bundled/tiny/catalog/local; None for a hub id."""
    from engine.models import TINY_MODELS, check_local_model_dir, minilm_dir, tiny_config
    import json

    if name in TINY_MODELS:
        return tiny_config(TINY_MODELS[name], 30522).to_dict()
    if name == "minilm":
        return json.loads((minilm_dir() / "config.json").read_text())
    try:
        from engine.estimator import load_model_config
        return load_model_config(name)
    except Exception:
        pass
    p = Path(name).expanduser()
    if p.is_absolute() or name.startswith((".", "~")) or p.exists():
        roots = settings.model_roots if settings else None
        d = check_local_model_dir(p, roots)
        return json.loads((d / "config.json").read_text())
    return None


def check_against_model(cfg, settings: Optional[Settings] = None) -> Optional[tuple[int, int]]:
    """Apply the method to a weightless copy of the model; returns (n_params,
    n_trainable) or None when the model's config is not available here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from engine.methods import ApplyContext, count_parameters, get_method
    from engine.models import ModelLoadError
    from engine.prepare import apply_method

    try:
        conf = model_config_for(cfg.model, settings)
    except ModelLoadError as e:
        raise SubmitError(str(e)) from None
    if conf is None:
        return None
    conf = dict(conf)
    mt = conf.pop("model_type", None)
    if mt is None:
        return None
    try:
        hf_conf = AutoConfig.for_model(mt, **{k: v for k, v in conf.items()
                                              if k not in ("architectures", "transformers_version", "_name_or_path")})
    except Exception as e:
        raise SubmitError(f"model: unsupported config: {e}") from None
    cls = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
    spec = get_method(cfg.method.name)
    try:
        with torch.device("meta"):
            model = cls.from_config(hf_conf)
        model = apply_method(model, spec, cfg.method, ApplyContext(task=cfg.task, seed=cfg.training.seed))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise SubmitError(str(e)) from None
    except Exception as e:   # a method that cannot run on the meta device: checked by the worker instead
        log.info("meta-device check skipped for %s: %s", cfg.method.name, e)
        return None
    return count_parameters(model)


def estimate_for(cfg) -> Optional[dict]:
    """The memory estimate stored with a run (None when the estimator cannot place the model)."""
    try:
        from engine.estimator import estimate
        t = cfg.training
        est = estimate(cfg.model, cfg.method.model_dump(exclude_none=True), batch_size=t.batch_size,
                       seq_len=t.max_seq_len, dtype="fp32" if t.precision in ("auto", "fp32") else t.precision,
                       task=cfg.task)
        return est.to_json()
    except Exception as e:
        log.info("no estimate for %s/%s: %s", cfg.model, cfg.method.name, e)
        return None


# ------------------------------------------------------------------ runs

def enqueue(settings: Settings, run_id: int, priority: int = 5) -> None:
    from workers.celery_app import make_celery

    app = make_celery(settings)
    app.send_task("studio.train_run", args=[run_id], queue=settings.queue, priority=priority)


def submit_run(settings: Settings, cfg_dict: dict, *, owner: Optional[str] = None, priority: int = 0) -> int:
    """Validate, record as `queued`, and put on the queue. Returns the run id."""
    cfg = validate_config(cfg_dict)
    est = estimate_for(cfg)
    with db.transaction(settings.database_url) as s:
        run = db.create_run(s, cfg.to_dict(), owner=owner, estimate=est,
                            estimated_peak=(est or {}).get("rows", {}).get("total"), priority=priority)
        run_id = run.id
    try:
        enqueue(settings, run_id)
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


def get_run(settings: Settings, run_id: int) -> dict:
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        d = db.run_to_dict(run)
        ad = s.scalar(select(db.Adapter).where(db.Adapter.run_id == run_id))
        d["adapter"] = {"size": ad.size, "sha256": ad.sha256, "files": ad.files} if ad else None
        return d


def get_metrics(settings: Settings, run_id: int, after_step: int = 0) -> list[dict]:
    with db.transaction(settings.database_url) as s:
        if s.get(db.Run, run_id) is None:
            raise NotFound(f"run {run_id} not found")
        rows = s.scalars(select(db.Metric).where(db.Metric.run_id == run_id, db.Metric.step > after_step)
                         .order_by(db.Metric.step))
        return [{"step": m.step, "loss": m.loss, "lr": m.lr, "tokens_per_s": m.tokens_per_s,
                 "elapsed_s": m.elapsed_s, "eta_s": m.eta_s, "epoch": m.epoch, "eval": m.eval} for m in rows]


def get_adapter(settings: Settings, run_id: int) -> tuple[bytes, str]:
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        ad = s.scalar(select(db.Adapter).where(db.Adapter.run_id == run_id))
        if ad is None:
            raise NotFound(f"run {run_id} has no adapter (status {run.status})")
        return ad.data, safe_filename(f"{run.name}-run{run.id}-{run.method}.zip")


def cancel_run(settings: Settings, run_id: int) -> str:
    with db.transaction(settings.database_url) as s:
        st = db.request_cancel(s, run_id)
    if st is None:
        raise NotFound(f"run {run_id} not found")
    return st


def delete_run(settings: Settings, run_id: int) -> None:
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        if run.status == "running":
            raise SubmitError(f"run {run_id} is running; cancel it first")
        s.execute(delete(db.Metric).where(db.Metric.run_id == run_id))
        s.execute(delete(db.Adapter).where(db.Adapter.run_id == run_id))
        s.delete(run)


def list_workers(settings: Settings) -> list[dict]:
    with db.transaction(settings.database_url) as s:
        return [{"name": w.name, "host": w.host, "device": w.device, "total_memory": w.total_memory,
                 "free_memory": w.free_memory, "queue": w.queue,
                 "heartbeat_at": w.heartbeat_at.isoformat() + "Z"}
                for w in db.live_workers(s, max(30.0, 3 * settings.heartbeat_interval_s))]


# ------------------------------------------------------------------ uploads

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
ALLOWED_UPLOADS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"PK\x03\x04", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")


def safe_filename(name: str) -> str:
    """A display-safe file name: no directories, no odd characters, bounded length."""
    base = os.path.basename(name.replace("\\", "/")) or "file"
    base = _SAFE.sub("_", base).strip("._") or "file"
    return base[:120]


def sniff_upload(head: bytes, suffix: str) -> None:
    if head.startswith(PICKLE_MAGIC):
        raise SubmitError("upload: the file is a Python pickle; pickles are never loaded")
    if suffix != ".parquet" and head.startswith(COMPRESSED_MAGIC):
        raise SubmitError("upload: the file is compressed or an archive; upload plain CSV, JSONL or Parquet")
    if suffix == ".parquet" and not head.startswith(b"PAR1"):
        raise SubmitError("upload: the file is named .parquet but is not a Parquet file")


def save_upload(settings: Settings, filename: str, source_path: str | Path, *, owner: Optional[str] = None) -> dict:
    """Store an uploaded dataset under a generated name in the data dir, validate
    that it parses, and record it. Returns its description with preview rows."""
    from engine.data import DataError

    src = Path(source_path)
    if src.is_symlink():
        raise SubmitError("upload: symbolic links are refused")
    display = safe_filename(filename)
    suffix = Path(display).suffix.lower()
    if suffix not in ALLOWED_UPLOADS:
        raise SubmitError(f"upload: unsupported file type {suffix or '(none)'!r}; use .csv, .jsonl or .parquet")
    size = src.stat().st_size
    if size == 0:
        raise SubmitError("upload: the file is empty")
    if size > settings.max_upload_bytes:
        raise SubmitError(f"upload: {size / 2**20:.1f} MiB is over the limit of "
                          f"{settings.max_upload_bytes / 2**20:.0f} MiB")
    with open(src, "rb") as f:
        sniff_upload(f.read(8), suffix)
    settings.ensure_dirs()
    stored = f"{uuid.uuid4().hex}{'.jsonl' if suffix == '.json' else suffix}"
    dest = settings.uploads_dir / stored
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=settings.uploads_dir)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        try:
            rows = _read_checked(tmp, suffix, settings.max_upload_bytes)
        except DataError as e:
            raise SubmitError(str(e).replace(Path(tmp).name, display)) from None
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    columns = list(rows[0].keys())
    with db.transaction(settings.database_url) as s:
        up = db.Upload(name=display, stored_name=stored, format=ALLOWED_UPLOADS[suffix], size=size,
                       sha256=h.hexdigest(), rows=len(rows), columns=columns, owner=owner)
        s.add(up)
        s.flush()
        uid = up.id
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
