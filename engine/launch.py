"""Starting the ranks of a distributed run: `launch_local` (N processes on this
machine under torch's elastic agent) and `run_rank`, the body of one rank that
any launcher calls once its process group is up (the local agent, or a Ray Train
worker). The process-group code itself is in engine.distributed.

Nothing here pickles: the job each rank reads is JSON, and training states
(resume, checkpoints, a cancelled run's last state) are safetensors files with
JSON metadata (engine.state_file)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from .distributed import DistributedError, check_method, free_port
from .state_file import load_state, save_state

PREPARE_KEYS = ("allowed_roots", "cache_dir", "max_data_bytes", "path_resolver", "data_cache_dir")


def plain_prepare(cfg, prepare_kwargs: Optional[dict]) -> dict:
    """`prepare_run` keyword arguments as JSON data for ranks in other processes: a
    `path_resolver` is applied here, once, to the config's dataset paths (the ranks
    get the resolved local files)."""
    kw = dict(prepare_kwargs or {})
    unknown = sorted(set(kw) - set(PREPARE_KEYS))
    if unknown:
        raise TypeError(f"prepare_kwargs: unknown key {unknown[0]!r} (allowed: {', '.join(PREPARE_KEYS)})")
    out: dict[str, Any] = {}
    if kw.get("allowed_roots") is not None:
        out["allowed_roots"] = [str(p) for p in kw["allowed_roots"]]
    if kw.get("cache_dir") is not None:
        out["cache_dir"] = str(kw["cache_dir"])
    if kw.get("max_data_bytes") is not None:
        out["max_data_bytes"] = int(kw["max_data_bytes"])
    if kw.get("data_cache_dir") is not None:
        out["data_cache_dir"] = str(kw["data_cache_dir"])
    resolver = kw.get("path_resolver")
    if resolver is not None:
        out["dataset_paths"] = {p: str(resolver(p)) for _, p in cfg.dataset.file_paths()}
    return out


def prepare_from_plain(cfg, plain: dict):
    """engine.prepare.prepare_run with the arguments `plain_prepare` made."""
    from .prepare import prepare_run

    kw: dict[str, Any] = {}
    if "allowed_roots" in plain:
        kw["allowed_roots"] = [Path(p) for p in plain["allowed_roots"]]
    if "cache_dir" in plain:
        kw["cache_dir"] = Path(plain["cache_dir"])
    if "max_data_bytes" in plain:
        kw["max_data_bytes"] = plain["max_data_bytes"]
    if "data_cache_dir" in plain:
        kw["data_cache_dir"] = Path(plain["data_cache_dir"])
    paths = plain.get("dataset_paths")
    if paths is not None:
        def resolve(p: str) -> Path:
            if p not in paths:
                raise ValueError(f"dataset.path: {p!r} was not resolved by the launcher")
            return Path(paths[p])
        kw["path_resolver"] = resolve
    return prepare_run(cfg, **kw)


def with_world_size(cfg, n: Optional[int]):
    from .config import parse_run_config

    cfg = parse_run_config(cfg)
    n = n or cfg.training.distributed.world_size
    if n != cfg.training.distributed.world_size:
        d = cfg.to_dict()
        d["training"] = {**d["training"], "distributed": {"strategy": cfg.training.distributed.strategy,
                                                          "world_size": n}}
        cfg = parse_run_config(d)
    return cfg


def run_rank(cfg_dict: dict, plain: dict, resume: Optional[dict], *, rank: int,
             on_step: Optional[Callable[[dict], None]] = None,
             on_checkpoint: Optional[Callable[[int, dict], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None, progress: bool = False,
             own_group: bool = True):
    """One rank, in a process whose torch.distributed environment is set (or whose
    process group is already initialized, as Ray Train does). The callbacks are
    used on rank 0 only. Returns (TrainResult, adapter files by name) on rank 0 (no
    files for a cancelled run), None on the other ranks. With `own_group` the process
    group is destroyed at the end (a launcher that made it, like Ray, passes False)."""
    import torch.distributed as tdist

    from .adapters import adapter_files
    from .config import parse_run_config
    from .train import train

    cfg = parse_run_config(cfg_dict)
    prep = prepare_from_plain(cfg, plain)
    main = rank == 0
    if main and progress:
        print(f"[{cfg.name}] {cfg.method.name}: {prep.n_trainable:,} trainable of {prep.n_params:,} parameters "
              f"({100 * prep.trainable_ratio:.4f}%), {cfg.training.distributed.world_size} ranks", file=sys.stderr)
    try:
        result = train(prep, on_step=(lambda m: on_step(m.to_dict())) if main and on_step else None,
                       progress=progress and main, should_stop=should_stop if main else None,
                       resume_state=resume, on_checkpoint=on_checkpoint if main else None)
        if not main:
            return None
        files = {} if result.cancelled else adapter_files(prep)
        return result, files
    finally:
        if own_group and tdist.is_initialized():
            tdist.destroy_process_group()


def result_json(result) -> dict:
    d = result.to_dict()
    d["history"] = result.history
    return d


# ---- local launcher --------------------------------------------------------------------------------

def launch_local(cfg, out_dir: str | Path, world_size: Optional[int] = None, *,
                 on_progress: Optional[Callable[[dict], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_checkpoint: Optional[Callable[[int, dict], None]] = None,
                 resume_state: Optional[dict] = None, progress: bool = False,
                 prepare_kwargs: Optional[dict] = None,
                 on_ranks: Optional[Callable[[list[dict]], None]] = None):
    """Train `cfg` as `world_size` local ranks (torch's elastic agent, one process per
    rank) and return rank 0's TrainResult. Rank 0 writes into `out_dir` what
    `peft-studio train` writes: the adapter files, `results.json` and `metrics.jsonl`.

    Callbacks run in this process: `on_progress(step_metrics_dict)` after every step,
    `on_checkpoint(step, state)` for every checkpoint (the full trainable and optimizer
    state, resumable at any world size), `should_stop()` polled twice a second
    (True: the ranks stop after their current step, the result is `cancelled` with its
    `last_state`), `on_ranks([{rank, host, pid, device}, ...])` once every rank has
    started. `prepare_kwargs` go to `engine.prepare.prepare_run` in each rank as plain
    data (see `plain_prepare`). A rank that dies raises DistributedError naming it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .methods import get_method
    from .train import TrainResult

    cfg = with_world_size(cfg, world_size)
    n = cfg.training.distributed.world_size
    check_method(get_method(cfg.method.name), cfg.training.distributed.strategy, n)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".launch-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    job = {"config": cfg.to_dict(), "out": str(out), "work": str(work), "progress": progress,
           "prepare": plain_prepare(cfg, prepare_kwargs), "resume": None}
    try:
        if resume_state is not None:
            save_state(resume_state, work / "resume.safetensors")
            job["resume"] = str(work / "resume.safetensors")
        (work / "job.json").write_text(json.dumps(job))
        lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"peft-studio-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          rdzv_configs={"timeout": 300}, max_restarts=0, monitor_interval=0.2)
        stop = threading.Event()
        failed: list[BaseException] = []
        tail = threading.Thread(target=_follow, args=(work, n, on_progress, on_checkpoint, should_stop, on_ranks,
                                                      stop, failed), daemon=True)
        tail.start()
        try:
            # each rank is a fresh interpreter (not a multiprocessing child): nothing of the caller's
            # __main__ is re-imported, and the rank's own environment holds RANK / WORLD_SIZE
            elastic_launch(lc, sys.executable)("-m", "engine.launch", str(work / "job.json"))
        except ChildFailedError as e:
            raise DistributedError(describe_failure(e)) from None
        finally:
            stop.set()
            tail.join()
        if failed:      # a callback raised: the ranks were stopped; the caller sees its error
            raise failed[0]
        d = json.loads((work / "result.json").read_text())
        last = work / "last_state.safetensors"
        return TrainResult(**d, last_state=load_state(last) if last.exists() else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def describe_failure(e) -> str:
    """'rank R (pid P) …' for every failed rank, first failure first."""
    parts = []
    for rank, f in sorted(e.failures.items(), key=lambda kv: kv[1].timestamp):
        if f.signal_name() != "<N/A>" and f.exitcode < 0:
            why = f"was killed by signal {f.signal_name()}"
        else:
            msg = f.message if isinstance(f.message, str) else (f.message or {}).get("message", "")
            msg = (msg or "").strip().splitlines()
            why = f"failed with exit code {f.exitcode}" + (f": {msg[-1] if msg else ''}" if msg else "")
        parts.append(f"rank {rank} (pid {f.pid}) {why}")
    return "distributed run failed: " + "; ".join(parts) if parts else f"distributed run failed: {e}"


def _follow(work: Path, n: int, on_progress, on_checkpoint, should_stop, on_ranks, stop: threading.Event,
            failed: list) -> None:
    """In the launching process: relay rank 0's events to the callbacks, and a stop
    request to the ranks. A callback that raises stops the ranks; its exception is
    kept in `failed` for the launcher to raise."""
    events = work / "events.jsonl"
    f = None
    buf = ""
    ranks_told = on_ranks is None
    try:
        while True:
            finished = stop.is_set()
            if (failed or (should_stop is not None and should_stop())) and not (work / "stop").exists():
                (work / "stop").touch()
            if not ranks_told and len(list(work.glob("rank*.json"))) >= n:
                ranks_told = True
                try:
                    on_ranks(rank_places(work.parent))
                except Exception as e:   # noqa: BLE001  (handed to the launcher)
                    failed.append(e)
            if f is None and events.exists():
                f = open(events)
            if f is not None:
                buf += f.read()
                *lines, buf = buf.split("\n")
                for line in lines:
                    ev = json.loads(line)
                    try:
                        if "metrics" in ev and on_progress is not None and not failed:
                            on_progress(ev["metrics"])
                        elif "checkpoint" in ev:
                            p = Path(ev["path"])
                            if on_checkpoint is not None and not failed:
                                on_checkpoint(ev["checkpoint"], load_state(p))
                            p.unlink(missing_ok=True)
                    except Exception as e:   # noqa: BLE001  (handed to the launcher)
                        failed.append(e)
            if finished:
                return
            stop.wait(0.5)
    finally:
        if f is not None:
            f.close()


def rank_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _rank_main(job_path: str) -> None:
    """One rank of a `launch_local` run (a fresh process started by the elastic agent)."""
    import torch

    job = json.loads(Path(job_path).read_text())
    rank, local_world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:       # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from .adapters import write_dir_atomic

    out, work = Path(job["out"]), Path(job["work"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    (work / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "pid": os.getpid(),
                                                       "host": socket.gethostname(), "device": device}))
    resume = load_state(job["resume"]) if job["resume"] else None
    main = rank == 0
    mf = ev = None
    if main:
        mf = open(out / ".metrics.jsonl.tmp", "w")
        ev = open(work / "events.jsonl", "w")

    def emit(obj):
        ev.write(json.dumps(obj) + "\n")
        ev.flush()

    def on_step(d):
        mf.write(json.dumps(d) + "\n")
        mf.flush()
        emit({"metrics": d})

    def on_checkpoint(step, state):
        p = work / f"checkpoint-{step}.safetensors"
        save_state(state, p)
        emit({"checkpoint": step, "path": str(p)})

    stop_file = work / "stop"
    try:
        got = run_rank(job["config"], job["prepare"], resume, rank=rank, on_step=on_step,
                       on_checkpoint=on_checkpoint, should_stop=lambda: stop_file.exists(),
                       progress=job["progress"])
        if not main:
            return
        result, files = got
        mf.close()
        os.replace(out / ".metrics.jsonl.tmp", out / "metrics.jsonl")
        if result.cancelled and result.last_state is not None:
            save_state(result.last_state, work / "last_state.safetensors")
        elif not result.cancelled:
            files["results.json"] = json.dumps(result.to_dict(), indent=2).encode()
            write_dir_atomic(out, files)
        (work / "result.json").write_text(json.dumps(result_json(result)))
    finally:
        for f in (mf, ev):
            if f is not None and not f.closed:
                f.close()


def rank_places(out_dir: str | Path) -> list[dict]:
    """Where each rank of a running `launch_local` job in out_dir runs: [{rank, pid, host, device}, ...]."""
    rows = []
    for p in sorted(Path(out_dir).glob(".launch-*/rank*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(rows, key=lambda r: r["rank"])


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    from engine.launch import _rank_main as rank_main   # the package's copy, not this __main__ one
    record(rank_main)(sys.argv[1])
