"""A run of several ranks on a Ray cluster (STUDIO_RAY_ADDRESS): Ray Train's
`TorchTrainer` with `ScalingConfig(num_workers=world_size, use_gpu=...)` starts
the ranks and their torch.distributed process group; each rank runs the engine's
rank body (engine.launch.run_rank). Imported only when STUDIO_RAY_ADDRESS is set.

A small actor (`Control`) carries, in order, rank 0's per-step metrics and
checkpoints (safetensors bytes, never pickled objects of ours) to this worker,
the cancel flag to the ranks, and where each rank runs. With training.retries,
Ray's `FailureConfig(max_failures=retries)` restarts the ranks, which resume from
the last checkpoint the actor holds."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from engine.distributed import DistributedError

log = logging.getLogger("peft_studio.ray")


class RayRunFailed(DistributedError):
    """A Ray run that failed after Ray's own restarts (FailureConfig): not requeued again."""

    retried_by_ray = True


class Control:
    """The run's mailbox between this worker and the ranks (a Ray actor)."""

    def __init__(self, resume: Optional[bytes]):
        self.events: list = []
        self.stop = False
        self.places: dict = {}
        self.latest = resume
        self.final = None

    def push(self, ev: dict) -> None:
        self.events.append(ev)

    def pull(self) -> list:
        out, self.events = self.events, []
        return out

    def checkpoint(self, step: int, data: bytes) -> None:
        self.latest = data
        self.events.append({"checkpoint": step, "state": data})

    def latest_state(self) -> Optional[bytes]:
        return self.latest

    def request_stop(self) -> None:
        self.stop = True

    def stopped(self) -> bool:
        return self.stop

    def place(self, rank: int, info: dict) -> None:
        self.places[rank] = info

    def get_places(self) -> dict:
        return self.places

    def finish(self, final: dict) -> None:
        self.final = final

    def get_final(self):
        return self.final


def train_loop(config: dict) -> None:
    """One Ray Train worker: one rank of the run (the process group is Ray's)."""
    import ray
    import ray.train
    import torch

    from engine.launch import result_json, run_rank
    from engine.state_file import state_from_bytes, state_to_bytes

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    control = config["control"]
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    ray.get(control.place.remote(rank, {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                                        "device": device, "node_ip": ray.util.get_node_ip_address()}))
    plain = dict(config["prepare"])
    with tempfile.TemporaryDirectory(prefix="peft-studio-ray-") as tmp:
        paths = {}
        for i, (orig, (suffix, data)) in enumerate(config["dataset_files"].items()):
            p = Path(tmp) / f"dataset-{i}{suffix}"
            p.write_bytes(data)
            paths[orig] = str(p)
        if paths:
            plain["dataset_paths"] = paths
        latest = ray.get(control.latest_state.remote())
        resume = state_from_bytes(latest) if latest else None

        def on_step(d: dict) -> None:
            control.push.remote({"metrics": d})      # calls from one caller run in order

        def on_checkpoint(step: int, state: dict) -> None:
            ray.get(control.checkpoint.remote(step, state_to_bytes(state)))

        got = run_rank(config["config"], plain, resume, rank=rank, on_step=on_step, on_checkpoint=on_checkpoint,
                       should_stop=lambda: ray.get(control.stopped.remote()), own_group=False)
    if got is not None:
        result, files = got
        last = state_to_bytes(result.last_state) if result.cancelled and result.last_state is not None else None
        ray.get(control.finish.remote({"result": result_json(result), "files": files, "last_state": last}))


def connect(address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    # a Celery worker's sys.stdout is a logging proxy without a file descriptor; Ray needs real ones
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        ray.init(address=address, log_to_driver=False, namespace="peft-studio")
    finally:
        sys.stdout, sys.stderr = out, err


def run_on_ray(address: str, settings, run_id: int, cfg, resume: Optional[dict], *,
               on_step: Callable[[dict], None], on_checkpoint: Callable[[int, dict], None],
               should_stop: Callable[[], bool], on_ranks: Callable[[list[dict]], None], prepare_kwargs: dict):
    """Train `cfg` on the Ray cluster at `address`; (TrainResult, adapter files)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.launch import plain_prepare
    from engine.state_file import state_from_bytes, state_to_bytes
    from engine.train import TrainResult

    connect(address)
    world = cfg.training.distributed.world_size
    plain = plain_prepare(cfg, prepare_kwargs)
    plain.pop("cache_dir", None)            # a path on this machine; each node uses its own model cache
    files = {orig: (Path(local).suffix, Path(local).read_bytes())
             for orig, local in plain.pop("dataset_paths", {}).items()}
    use_gpu = ray.cluster_resources().get("GPU", 0) >= world
    control = ray.remote(num_cpus=0)(Control).remote(state_to_bytes(resume) if resume is not None else None)
    retries = int(cfg.training.retries or 0)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"config": cfg.to_dict(), "prepare": plain, "dataset_files": files,
                                       "control": control},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu),
        run_config=RunConfig(name=f"peft-studio-run-{int(run_id)}-{uuid.uuid4().hex[:8]}",
                             storage_path=os.environ.get("STUDIO_RAY_STORAGE") or None,
                             failure_config=FailureConfig(max_failures=retries)))
    outcome: dict = {}

    def fit():
        try:
            trainer.fit()
        except BaseException as e:   # noqa: BLE001  (reported below)
            outcome["error"] = e

    t = threading.Thread(target=fit, daemon=True, name=f"ray-fit-{run_id}")
    t.start()
    told_places = stop_sent = False
    try:
        while True:
            done = not t.is_alive()
            if not stop_sent and should_stop():
                ray.get(control.request_stop.remote())
                stop_sent = True
            if not told_places:
                places = ray.get(control.get_places.remote())
                if len(places) >= world:
                    on_ranks([places[r] for r in sorted(places)])
                    told_places = True
            for ev in ray.get(control.pull.remote()):
                if "metrics" in ev:
                    on_step(ev["metrics"])
                else:
                    on_checkpoint(ev["checkpoint"], state_from_bytes(ev["state"]))
            if done:
                break
            time.sleep(0.5)
        if "error" in outcome:
            raise RayRunFailed(describe_ray_failure(outcome["error"], ray.get(control.get_places.remote())))
        final = ray.get(control.get_final.remote())
        if final is None:
            raise RayRunFailed("distributed run failed on Ray: rank 0 finished without a result")
        d = final["result"]
        last = state_from_bytes(final["last_state"]) if final["last_state"] else None
        return TrainResult(**d, last_state=last), final["files"]
    finally:
        if t.is_alive():            # an error here while Ray still trains: stop the ranks first
            try:
                ray.get(control.request_stop.remote())
            except Exception:   # noqa: BLE001
                pass
            t.join(timeout=120)
        ray.kill(control)


def describe_ray_failure(e: BaseException, places: dict) -> str:
    """'rank R (pid P on host H) …' for each failed rank Ray reports."""
    failures = getattr(e, "worker_failures", None)
    if not failures:
        return f"distributed run failed on Ray: {first_line(e)}"
    parts = []
    for rank, err in sorted(failures.items()):
        where = places.get(rank) or {}
        at = f" (pid {where['pid']} on {where['host']})" if where else ""
        parts.append(f"rank {rank}{at} {first_line(err)}")
    return "distributed run failed on Ray: " + "; ".join(parts)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
