"""Resumable training checkpoints in the data dir: trainable weights, optimizer and
scheduler state, RNG and data position. Tensors go to safetensors and the rest to
JSON (no pickle), written to a temporary directory and renamed into place, so a
checkpoint is either complete or absent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .settings import Settings


def checkpoint_dir(settings: Settings, run_id: int) -> Path:
    return settings.checkpoints_dir / f"run-{int(run_id)}"


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


def save_checkpoint(settings: Settings, run_id: int, state: dict) -> Path:
    """Persist a training state (as made by engine.train.training_state)."""
    tensors = {f"trainable.{k}": v.contiguous() for k, v in state["trainable"].items()}
    opt_tensors, opt_meta = _flatten_optimizer(state["optimizer"])
    tensors.update(opt_tensors)
    tensors["rng"] = state["rng"].contiguous()
    meta = {"step": state["step"], "optimizer": opt_meta, "scheduler": state["scheduler"], "data": state["data"]}
    final = checkpoint_dir(settings, run_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".run-{run_id}-", dir=final.parent))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, default=float))
        old = None
        if final.exists():
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(settings: Settings, run_id: int) -> Optional[dict]:
    d = checkpoint_dir(settings, run_id)
    if not (d / "state.json").exists():
        old = d.with_name(d.name + ".old")   # a crash between the two renames
        if (old / "state.json").exists():
            d = old
        else:
            return None
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "state.safetensors"))
    trainable = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
    return {"step": meta["step"], "trainable": trainable,
            "optimizer": _unflatten_optimizer(tensors, meta["optimizer"]),
            "scheduler": meta["scheduler"], "data": meta["data"], "rng": tensors["rng"]}


def checkpoint_step(settings: Settings, run_id: int) -> Optional[int]:
    d = checkpoint_dir(settings, run_id)
    try:
        return int(json.loads((d / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def delete_checkpoint(settings: Settings, run_id: int) -> None:
    d = checkpoint_dir(settings, run_id)
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(d.with_name(d.name + ".old"), ignore_errors=True)
