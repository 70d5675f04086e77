"""Things built from a finished run on demand: the trained model rebuilt from the
base model and the stored adapter (for the playground and merging), and the merged
model zip for methods that merge into the base weights. The adapter comes from the
artifact store (verified by sha256); a merged zip is built once per adapter and
kept in the store beside it, so any studio process serves it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Optional

from sqlalchemy import select

from workers import db
from workers.settings import Settings

from . import service

log = logging.getLogger("peft_studio.artifacts")
_BUILD_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
MERGED = "merged"


class ArtifactError(ValueError):
    """A run whose artifact cannot be built; the message says why."""


def adapter_dir_for(settings: Settings, run_id: int, dest: Path) -> Path:
    """Unpack run `run_id`'s adapter zip into `dest` (safely: plain files only)."""
    from engine.adapters import extract_zip_safely

    path, _name = service.adapter_file(settings, run_id)
    return extract_zip_safely(path.read_bytes(), dest)


def load_base(settings: Settings, cfg, labels: list[str]):
    """The base model of a run, as the worker loaded it (same seed, same labels)."""
    from engine.adapters import load_base as engine_load_base

    return engine_load_base(cfg, labels, allowed_roots=settings.model_roots, cache_dir=settings.models_dir)


def load_trained(settings: Settings, run_id: int):
    """The run's model with its adapter, in eval mode, as an engine Prepared (so
    engine helpers, merge and export, apply); `examples` holds only the labels."""
    from engine.adapters import load_trained as engine_load_trained
    from engine.config import parse_run_config

    run = service.get_run(settings, run_id)
    if run["status"] != "succeeded":
        raise ArtifactError(f"run {run_id} is {run['status']}; only succeeded runs have a trained adapter")
    cfg = parse_run_config(run["config"])
    tmp = Path(tempfile.mkdtemp(prefix=f"adapter-run{run_id}-"))
    try:
        d = adapter_dir_for(settings, run_id, tmp)
        return engine_load_trained(cfg, d, allowed_roots=settings.model_roots, cache_dir=settings.models_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merged_name(run: dict) -> str:
    return service.safe_filename(f"{run['name']}-run{run['id']}-{run['method']}-merged.zip")


def merged_readme(run: dict) -> str:
    auto = "AutoModelForSequenceClassification" if run["task"] == "classification" else "AutoModelForCausalLM"
    return (f"# {run['name']} — merged model (PEFT Studio run {run['id']})\n\n"
            f"The `{run['method']}` adapter merged into the weights of `{run['model']}`: a plain Transformers "
            f"model, no adapter library needed.\n\n```python\nfrom transformers import {auto}\n"
            f"model = {auto}.from_pretrained('path/to/this/unzipped/folder')\n```\n")


def zip_dir_to(path: Path, d: Path, extra: Optional[dict[str, bytes]] = None) -> None:
    """Zip a directory's files (and `extra`) into `path` on disk, file by file."""
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(d.iterdir()):
            if p.is_file():
                kind = zipfile.ZIP_STORED if p.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                z.write(p, p.name, compress_type=kind)
        for name, data in (extra or {}).items():
            z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)


def _lock_for(run_id: int) -> threading.Lock:
    with _LOCKS_GUARD:
        return _BUILD_LOCKS.setdefault(run_id, threading.Lock())


def merged_object(settings: Settings, run_id: int, prefix: str) -> Optional[tuple[str, str]]:
    """(key, sha256) of the merged zip recorded for this adapter, if built already."""
    with db.transaction(settings.database_url) as s:
        row = s.scalar(select(db.Artifact).where(db.Artifact.run_id == run_id, db.Artifact.kind == MERGED,
                                                 db.Artifact.key.startswith(prefix)).order_by(db.Artifact.id))
        return (row.key, row.sha256) if row else None


def merged_zip_path(settings: Settings, run_id: int) -> tuple[Path, str]:
    """The merged model zip of a run (built on first request, then kept in the
    store): a local verified copy and its download name."""
    from engine.adapters import merged_model_files
    from engine.methods import get_method
    from workers.store import get_store

    run = service.get_run(settings, run_id)
    spec = get_method(run["method"])
    if not spec.mergeable or spec.merge is None:
        raise ArtifactError(f"run {run_id}: method {run['method']!r} does not merge into the base weights; "
                            f"download the adapter instead")
    if run["status"] != "succeeded" or not run.get("adapter"):
        raise ArtifactError(f"run {run_id} is {run['status']}; only succeeded runs can be merged")
    store = get_store(settings)
    prefix = f"runs/{int(run_id)}/merged-{run['adapter']['sha256'][:16]}-"
    with _lock_for(run_id):
        found = merged_object(settings, run_id, prefix)
        if found:
            return store.get_file(found[0], found[1], ".zip"), merged_name(run)
        prep = load_trained(settings, run_id)
        merged = merged_model_files(prep)
        fd, tmp = tempfile.mkstemp(prefix=f".merged-{run_id}-", suffix=".zip", dir=store.scratch_dir())
        os.close(fd)
        try:
            readme = merged_readme(run).encode()
            cfg = json.dumps(run["config"], indent=2).encode()
            zip_dir_to(Path(tmp), merged, {"README.md": readme, "run_config.json": cfg})
            obj = store.put_file(f"{prefix}{uuid.uuid4().hex[:8]}.zip", tmp)
        finally:
            shutil.rmtree(merged, ignore_errors=True)
            os.unlink(tmp)
        try:
            with db.transaction(settings.database_url) as s:
                s.add(db.Artifact(run_id=run_id, kind=MERGED, key=obj.key, size=obj.size, sha256=obj.sha256))
        except BaseException:   # not recorded (e.g. the run was deleted meanwhile): no orphan object
            store.delete(obj.key)
            raise
        log.info("run %s: merged model built (%d bytes, %s)", run_id, obj.size, obj.key)
        found = merged_object(settings, run_id, prefix)
    return store.get_file(found[0], found[1], ".zip"), merged_name(run)
