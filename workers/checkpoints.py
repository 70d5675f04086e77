"""Resumable training checkpoints in the artifact store, so whichever worker claims
a requeued run resumes it: trainable weights, optimizer and scheduler state, RNG
and data position. One safetensors object per checkpoint (the non-tensor state
as JSON in its metadata; no pickle). The database row (kind "checkpoint", key,
size, sha256, step) is the commit point: the object is written whole first, the
row then points at it, and only then is the previous checkpoint's object removed."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import delete, select

from . import db
from .settings import Settings
from .store import StoreError, get_store

log = logging.getLogger("peft_studio.checkpoints")
KIND = "checkpoint"


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict] = {}
    for idx, st in opt_state["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
                entry[k] = "tensor"
            else:
                entry[k] = v
        meta_state[str(idx)] = entry
    return tensors, {"state": meta_state, "param_groups": opt_state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"optimizer.{idx}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _row(s, run_id: int) -> Optional[db.Artifact]:
    return s.scalar(select(db.Artifact).where(db.Artifact.run_id == run_id, db.Artifact.kind == KIND)
                    .order_by(db.Artifact.id.desc()))


def save_checkpoint(settings: Settings, run_id: int, state: dict) -> str:
    """Persist a training state (as made by engine.train.training_state); returns its key."""
    tensors = {f"trainable.{k}": v.detach().cpu().contiguous() for k, v in state["trainable"].items()}
    opt_tensors, opt_meta = _flatten_optimizer(state["optimizer"])
    tensors.update(opt_tensors)
    tensors["rng"] = state["rng"].contiguous()
    meta = {"step": state["step"], "optimizer": opt_meta, "scheduler": state["scheduler"], "data": state["data"]}
    store = get_store(settings)
    step = int(state["step"])
    key = f"runs/{int(run_id)}/checkpoints/step-{step:08d}-{uuid.uuid4().hex[:8]}.safetensors"
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".safetensors", dir=store.scratch_dir())
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"peft_studio": json.dumps(meta, default=float)})
        obj = store.put_file(key, tmp)
    finally:
        os.unlink(tmp)
    try:
        with db.transaction(settings.database_url) as s:
            old = [r.key for r in s.scalars(select(db.Artifact).where(db.Artifact.run_id == run_id,
                                                                      db.Artifact.kind == KIND))]
            s.execute(delete(db.Artifact).where(db.Artifact.run_id == run_id, db.Artifact.kind == KIND))
            s.add(db.Artifact(run_id=run_id, kind=KIND, key=obj.key, size=obj.size, sha256=obj.sha256, step=step))
    except BaseException:   # not recorded: remove the object, keep the previous checkpoint
        store.delete(obj.key)
        raise
    for k in old:
        try:
            store.delete(k)
        except StoreError as e:
            log.warning("run %s: an old checkpoint object stays behind: %s", run_id, e)
    return obj.key


def load_checkpoint(settings: Settings, run_id: int) -> Optional[dict]:
    """The run's last checkpoint (verified by sha256), or None when it has none."""
    with db.transaction(settings.database_url) as s:
        row = _row(s, run_id)
        if row is None:
            return None
        key, sha = row.key, row.sha256
    path = get_store(settings).get_file(key, sha, suffix=".safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["peft_studio"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    trainable = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
    return {"step": meta["step"], "trainable": trainable,
            "optimizer": _unflatten_optimizer(tensors, meta["optimizer"]),
            "scheduler": meta["scheduler"], "data": meta["data"], "rng": tensors["rng"]}


def checkpoint_step(settings: Settings, run_id: int) -> Optional[int]:
    with db.transaction(settings.database_url) as s:
        row = _row(s, run_id)
        return row.step if row is not None else None


def delete_checkpoint(settings: Settings, run_id: int) -> None:
    """Forget the run's checkpoints (row first, then the objects), including any object a
    worker killed between publishing it and recording it left under the run's prefix."""
    with db.transaction(settings.database_url) as s:
        keys = list(s.scalars(select(db.Artifact.key).where(db.Artifact.run_id == run_id, db.Artifact.kind == KIND)))
        s.execute(delete(db.Artifact).where(db.Artifact.run_id == run_id, db.Artifact.kind == KIND))
    try:
        keys = sorted(set(keys) | set(get_store(settings).list(f"runs/{int(run_id)}/checkpoints/")))
    except StoreError as e:
        log.warning("run %s: could not list its checkpoint objects: %s", run_id, e)
    for k in keys:
        try:
            get_store(settings).delete(k)
        except StoreError as e:
            log.warning("run %s: a checkpoint object stays behind: %s", run_id, e)
