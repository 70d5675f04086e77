"""One run over several processes with torch.distributed: the process group, the
DDP / FSDP2 wrapping, the per-rank shard of each global batch, full checkpoints
from sharded state, and a local launcher built on torch's elastic agent.

World size 1 never touches this module's process-group code: `init` returns None
and the training loop runs as a single process.

- `ddp`: `DistributedDataParallel` (Li et al., "PyTorch Distributed: Experiences on
  Accelerating Data Parallel Training", VLDB 2020) over the trainable parameters;
  frozen ones are ignored by its reducer.
- `fsdp`: FSDP2 `fully_shard` (Zhao et al., "PyTorch FSDP", VLDB 2023) on every
  decoder block, then on the root, so frozen and trainable weights, gradients and
  optimizer states are split N ways. It runs on CPU with gloo (torch 2.13).

Backends: gloo on CPU, nccl on CUDA. The global batch is batch_size x world_size
rows (per accumulation step); every rank builds the same global batch and keeps
its contiguous share, and its loss is weighted by its share of the global token
count, so N ranks take the same step as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as tdist
from torch import nn

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A distributed run that cannot start or that lost a rank; the message says which and why."""


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    strategy: str                 # "ddp" | "fsdp"
    device: torch.device
    backend: str                  # "gloo" | "nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"environment WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init(dist_cfg, device: torch.device) -> Optional[Dist]:
    """Join (or reuse) the process group described by the elastic launcher's
    environment. None for world size 1: no process group at all."""
    want = dist_cfg.world_size
    have = env_world_size()
    if want == 1 and have == 1:
        return None
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if want > 1 and missing:
        raise DistributedError(
            f"training.distributed.world_size is {want} but this process was not started as one of {want} ranks "
            f"(no {', '.join(missing)} in the environment): launch it with engine.distributed.launch_local, "
            f"`peft-studio train`, or torchrun --nproc-per-node {want}")
    if have != want:
        raise DistributedError(f"training.distributed.world_size is {want} but the launcher started {have} ranks")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: local rank {local_rank} has no CUDA device "
                                   f"(this machine has {torch.cuda.device_count()})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                 **({"device_id": device} if backend == "nccl" else {}))
    return Dist(rank, want, local_rank, dist_cfg.strategy, device, backend)


def check_method(spec, strategy: str, world_size: int) -> None:
    """Refuse, with the reason, a method that cannot run under this strategy. DDP runs
    every method: each rank holds the whole model and, after backward, the same
    averaged gradients, so hooks such as AdaLoRA's rank allocation see identical
    inputs and make identical choices on every rank."""
    if world_size > 1 and strategy == "fsdp" and (spec.after_backward is not None or spec.after_step is not None):
        raise DistributedError(
            f"method {spec.name!r} cannot run with training.distributed.strategy 'fsdp': its training hooks read "
            f"whole parameters and gradients between steps, and FSDP keeps only a 1/{world_size} shard on each "
            f"rank; use strategy 'ddp'")


# ---- the batch each rank trains on ---------------------------------------------------------------

def target_count(batch: dict, task: str) -> int:
    """What the mean loss of `batch` is averaged over: predicted tokens (causal LM) or rows."""
    if task == "classification":
        return int(batch["labels"].shape[0])
    return int((batch["labels"][:, 1:] != -100).sum())


def shard_batch(batch: dict, dist: Dist, task: str) -> tuple[dict, float]:
    """This rank's contiguous share of a global batch and the weight of its mean loss:
    (its targets / all targets) x world size, so that DDP's gradient average is the
    gradient of the global mean. A rank left without rows (a short last batch)
    computes on one row with weight 0, so every rank runs the same collectives."""
    n_global = target_count(batch, task)
    rows = batch["input_ids"].shape[0]
    lo, hi = _split(rows, dist.world_size, dist.rank)
    if hi <= lo:
        local = {k: v[:1] for k, v in batch.items()}
        return local, 0.0
    local = {k: v[lo:hi] for k, v in batch.items()}
    width = int(local["attention_mask"].sum(dim=1).max())    # drop columns that are padding in every local row
    if width < local["input_ids"].shape[1]:
        local = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in local.items()}
    n_local = target_count(local, task)
    return local, (n_local / n_global * dist.world_size) if n_global else 0.0


def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    lo = i * base + min(i, extra)
    return lo, lo + base + (1 if i < extra else 0)


def shard_rows(rows: list, dist: Optional[Dist]) -> list:
    if dist is None:
        return rows
    lo, hi = _split(len(rows), dist.world_size, dist.rank)
    return rows[lo:hi]


# ---- wrapping --------------------------------------------------------------------------------------

def wrap(runner: nn.Module, model: nn.Module, dist: Dist) -> nn.Module:
    """`runner` (a module whose forward computes the loss through `model`) under DDP
    or FSDP2. The returned module is what forward must go through."""
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # static_graph: the set of trainable parameters that get gradients is the same every
        # step, so DDP learns it once (prompt/prefix methods and heads that a task does not
        # use need no find_unused_parameters search per step)
        return DDP(runner, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                   static_graph=True, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import fully_shard
    from .arch import blocks

    for block in blocks(model):
        fully_shard(block)
    fully_shard(runner)
    return runner


@contextlib.contextmanager
def no_grad_sync(runner: nn.Module, dist: Optional[Dist], sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last accumulation
    micro-batch. The caller syncs every micro-batch of the first step: DDP's static
    graph is learnt from a synced backward (a no_sync one first trips its reducer)."""
    if dist is None or sync:
        if dist is not None and dist.strategy == "fsdp":
            runner.set_requires_gradient_sync(True)
        yield
    elif dist.strategy == "ddp":
        with runner.no_sync():
            yield
    else:
        runner.set_requires_gradient_sync(False)
        yield


def eval_module(runner: nn.Module, dist: Optional[Dist]) -> nn.Module:
    """What evaluation calls: DDP's inner module (no reducer involved), FSDP's root."""
    if dist is not None and dist.strategy == "ddp":
        return runner.module
    return runner


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a DTensor shard (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def as_local_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (whole) shaped like `param`: this rank's shard when `param` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with every sharded state tensor made whole (collective under FSDP)."""
    sd = opt.state_dict()
    return {"state": {i: {k: (full(v).cpu() if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                          for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, state: dict, params: list[torch.Tensor]) -> None:
    """Load a whole-tensor optimizer state into an optimizer over (possibly sharded) params."""
    st = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        st[i] = {k: (as_local_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in s.items()}
    opt.load_state_dict({"state": st, "param_groups": state["param_groups"]})


def unshard_for_export(runner: nn.Module, dist: Optional[Dist]) -> None:
    """Gather every FSDP module's parameters back into plain tensors (collective), so the
    model can be read, saved and evaluated like an unsharded one."""
    if dist is None or dist.strategy != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule
    for m in runner.modules():
        if isinstance(m, FSDPModule):
            m.unshard()


# ---- local launcher --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(cfg, out_dir: str | Path, world_size: Optional[int] = None, *,
                 on_progress: Optional[Callable[[dict], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_checkpoint: Optional[Callable[[int, dict], None]] = None,
                 resume_state: Optional[dict] = None, progress: bool = False,
                 prepare_kwargs: Optional[dict] = None):
    """Train `cfg` as `world_size` local ranks (torch's elastic agent, one process per
    rank) and return rank 0's TrainResult. Rank 0 writes into `out_dir` what
    `peft-studio train` writes: the adapter files, `results.json` and `metrics.jsonl`.

    Callbacks run in this process: `on_progress(step_metrics_dict)` after every step,
    `on_checkpoint(step, state)` for every checkpoint (the full trainable and optimizer
    state, resumable at any world size), `should_stop()` polled twice a second
    (True: the ranks stop after their current step, the result is `cancelled` with its
    `last_state`). `prepare_kwargs` go to `engine.prepare.prepare_run` in each rank and
    must pickle. A rank that dies raises DistributedError naming the rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .config import parse_run_config
    from .methods import get_method
    from .train import TrainResult

    cfg = parse_run_config(cfg)
    n = world_size or cfg.training.distributed.world_size
    if n != cfg.training.distributed.world_size:
        cfg = parse_run_config({**cfg.to_dict(), "training": {**cfg.to_dict()["training"], "distributed": {
            "strategy": cfg.training.distributed.strategy, "world_size": n}}})
    check_method(get_method(cfg.method.name), cfg.training.distributed.strategy, n)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".launch-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    job = {"config": cfg.to_dict(), "out": str(out), "work": str(work), "progress": progress,
           "prepare_kwargs": prepare_kwargs or {}, "resume": None}
    if resume_state is not None:
        torch.save(resume_state, work / "resume.pt")
        job["resume"] = str(work / "resume.pt")
    torch.save(job, work / "job.pt")
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"peft-studio-{uuid.uuid4().hex[:8]}",
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                      rdzv_configs={"timeout": 300}, max_restarts=0, monitor_interval=0.2)
    stop = threading.Event()
    failed: list[BaseException] = []
    tail = threading.Thread(target=_follow, args=(work, on_progress, on_checkpoint, should_stop, stop, failed),
                            daemon=True)
    tail.start()
    try:
        try:
            # each rank is a fresh interpreter (not a multiprocessing child): nothing of the caller's
            # __main__ is re-imported, and the rank's own environment holds RANK / WORLD_SIZE
            elastic_launch(lc, sys.executable)("-m", "engine.distributed", str(work / "job.pt"))
        except ChildFailedError as e:
            raise DistributedError(describe_failure(e)) from None
        finally:
            stop.set()
            tail.join()
        if failed:      # a callback raised: the ranks were stopped; the caller sees its error
            raise failed[0]
        d = json.loads((work / "result.json").read_text())
        last = work / "last_state.pt"
        state = torch.load(last, weights_only=True) if last.exists() else None
        return TrainResult(**d, last_state=state)
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


def _follow(work: Path, on_progress, on_checkpoint, should_stop, stop: threading.Event, failed: list) -> None:
    """In the launching process: relay rank 0's events to the callbacks, and a stop
    request to the ranks. A callback that raises stops the ranks; its exception is
    kept in `failed` for the launcher to raise."""
    events = work / "events.jsonl"
    f = None
    buf = ""
    try:
        while True:
            finished = stop.is_set()
            if (failed or (should_stop is not None and should_stop())) and not (work / "stop").exists():
                (work / "stop").touch()
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
                                on_checkpoint(ev["checkpoint"], torch.load(p, weights_only=True))
                            p.unlink(missing_ok=True)
                    except Exception as e:   # noqa: BLE001  (handed to the launcher)
                        failed.append(e)
            if finished:
                return
            stop.wait(0.5)
    finally:
        if f is not None:
            f.close()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rank_main(job_path: str) -> None:
    """One rank of a `launch_local` run (a fresh process started by the elastic agent)."""
    job = torch.load(job_path, weights_only=False)
    rank, local_world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:       # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from .adapters import save_adapter
    from .config import parse_run_config
    from .prepare import prepare_run
    from .train import train

    cfg = parse_run_config(job["config"])
    out, work = Path(job["out"]), Path(job["work"])
    (work / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}))
    resume = torch.load(job["resume"], weights_only=True) if job["resume"] else None
    prep = prepare_run(cfg, **job["prepare_kwargs"])
    main = rank == 0
    if main and job["progress"]:
        print(f"[{cfg.name}] {cfg.method.name}: {prep.n_trainable:,} trainable of {prep.n_params:,} parameters "
              f"({100 * prep.trainable_ratio:.4f}%), {cfg.training.distributed.world_size} ranks", file=sys.stderr)
    mf = ev = None
    if main:
        mf = open(out / ".metrics.jsonl.tmp", "w")
        ev = open(work / "events.jsonl", "w")

    def emit(obj):
        ev.write(json.dumps(obj) + "\n")
        ev.flush()

    def on_step(m):
        d = m.to_dict()
        mf.write(json.dumps(d) + "\n")
        mf.flush()
        emit({"metrics": d})

    def on_checkpoint(step, state):
        p = work / f"checkpoint-{step}.pt"
        _atomic_save(state, p)
        emit({"checkpoint": step, "path": str(p)})

    stop_file = work / "stop"
    try:
        result = train(prep, on_step=on_step if main else None, progress=job["progress"] and main,
                       should_stop=(lambda: stop_file.exists()) if main else None, resume_state=resume,
                       on_checkpoint=on_checkpoint if main else None)
        if not main:
            return
        mf.close()
        os.replace(out / ".metrics.jsonl.tmp", out / "metrics.jsonl")
        d = result.to_dict()
        d["history"] = result.history
        if result.cancelled and result.last_state is not None:
            _atomic_save(result.last_state, work / "last_state.pt")
        else:
            save_adapter(prep, out, extra_files={"results.json": json.dumps(result.to_dict(), indent=2).encode()})
        (work / "result.json").write_text(json.dumps(d))
    finally:
        for f in (mf, ev):
            if f is not None and not f.closed:
                f.close()
        if tdist.is_initialized():
            tdist.destroy_process_group()


def rank_places(out_dir: str | Path) -> list[dict]:
    """Where each rank of a running `launch_local` job in out_dir runs: [{rank, pid, host}, ...]."""
    rows = []
    for p in sorted(Path(out_dir).glob(".launch-*/rank*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(rows, key=lambda r: r["rank"])


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    from engine.distributed import _rank_main as rank_main   # the package's copy, not this __main__ one
    record(rank_main)(sys.argv[1])
