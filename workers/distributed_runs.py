"""A run of several ranks, as the worker that claimed it trains it: on this
machine through engine.launch.launch_local, or, with STUDIO_RAY_ADDRESS set, on a
Ray cluster (workers.ray_runs). Either way the caller gets rank 0's TrainResult
and the adapter's files, and its callbacks see every step, checkpoint and where
each rank runs."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

from .settings import Settings

OWN_FILES = ("results.json", "metrics.jsonl")    # written by the launcher; the published zip has its own


def ray_address() -> Optional[str]:
    return os.environ.get("STUDIO_RAY_ADDRESS") or None


def run_distributed(settings: Settings, run_id: int, cfg, resume: Optional[dict], *,
                    on_step: Callable[[dict], None], on_checkpoint: Callable[[int, dict], None],
                    should_stop: Callable[[], bool], on_ranks: Callable[[list[dict]], None],
                    prepare_kwargs: dict):
    """(TrainResult, adapter files by name; empty for a cancelled run). Raises
    engine.distributed.DistributedError naming a rank that died."""
    address = ray_address()
    if address:
        from .ray_runs import run_on_ray
        return run_on_ray(address, settings, run_id, cfg, resume, on_step=on_step, on_checkpoint=on_checkpoint,
                          should_stop=should_stop, on_ranks=on_ranks, prepare_kwargs=prepare_kwargs)
    from engine.launch import launch_local

    out = settings.data_dir / "runs" / f"run-{int(run_id)}-{uuid.uuid4().hex[:8]}"
    try:
        result = launch_local(cfg, out, on_progress=on_step, should_stop=should_stop, on_checkpoint=on_checkpoint,
                              resume_state=resume, prepare_kwargs=prepare_kwargs, on_ranks=on_ranks)
        files = {} if result.cancelled else read_files(out)
        return result, files
    finally:
        shutil.rmtree(out, ignore_errors=True)


def read_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in OWN_FILES}
