"""The process of one packed run (see workers/packing.py and docs/packing.md):

    python -m workers.run_child RUN_ID --fd N --parent PID [--token T] [--cap BYTES]

It trains the run with the unchanged `workers.tasks.execute_run` (claim by token,
heartbeats, cancel, checkpoints, publish, finish) and reports to the worker thread
that started it over the pipe on file descriptor N (a multiprocessing Connection):

- `{"kind": "prepared", "baseline": B, "tensors": T}` when `engine.prepare.prepare_run`
  returns: B = this process's resident memory then, less T, the bytes of the model's
  parameters and buffers. B is the process's own overhead; the worker measures the
  run's memory above it against the cap.
- `{"kind": "done", "status": S}` with execute_run's result.

SIGTERM (the worker's warm shutdown, forwarded, or the worker's death through
PR_SET_PDEATHSIG) sets `workers.tasks.SHUTDOWN`: the run is checkpointed and
requeued, as on a stopping solo worker. On CUDA, with `--cap`, the allocator is
limited to cap / device memory (`torch.cuda.set_per_process_memory_fraction`), and
a CUDA out-of-memory failure is recorded as out of the run's memory budget.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from typing import Optional

log = logging.getLogger("peft_studio.run_child")
_EARLY: list = []                       # a stop asked for while the libraries load


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the worker goes."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:          # the worker went before the request took effect
        sys.exit(3)


class Report:
    def __init__(self, conn):
        self.conn = conn

    def send(self, **msg) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):   # the worker stopped listening: nothing to report to
            pass


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def own_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def watch_prepare(report: Report) -> None:
    """Report the baseline when prepare_run returns: execute_run imports
    prepare_run from engine.prepare when it runs, so it gets this wrapper."""
    import engine.prepare as prepare

    inner = prepare.prepare_run

    def prepare_run(*args, **kwargs):
        prep = inner(*args, **kwargs)
        try:
            t = tensor_bytes(prep.model)
            report.send(kind="prepared", baseline=max(0, own_rss() - t), tensors=t)
        except Exception as e:   # no baseline: the worker does not watch this run's memory
            log.warning("no memory baseline: %s", e)
        return prep

    prepare.prepare_run = prepare_run


def cap_cuda(cap: int) -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = max(0.01, min(1.0, cap / total))
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


def record_cuda_oom(settings, run_id: int, cap: int) -> None:
    """A CUDA out-of-memory failure under the cap is the run leaving its budget."""
    import torch
    from sqlalchemy import update

    from workers import db
    from workers.packing import BUDGET_ERROR, MIB, RUN_SLACK_BYTES, gib

    peak = torch.cuda.max_memory_reserved(0)
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None or run.status != "failed" or run.worker_pid != os.getpid() \
                or not (run.error or "").startswith("OutOfMemoryError"):
            return
        est = ((run.estimate or {}).get("rows") or {}).get("total")
        margin = settings.worker_memory_margin
        msg = (f"{BUDGET_ERROR}: it needed more than its cap of {gib(cap)} of CUDA memory (it had reserved "
               f"{gib(peak)} when an allocation failed) = estimate {gib(est)} + margin {margin:.0%} + "
               f"{RUN_SLACK_BYTES // MIB} MiB; lower batch_size or max_seq_len, or raise STUDIO_WORKER_MEMORY_MARGIN. "
               f"{run.error}")
        s.execute(update(db.Run).where(db.Run.id == run_id, db.Run.status == "failed").values(error=msg[:4000]))


def child_main(run_id: int, token: Optional[int], cap: Optional[int], conn, early: list) -> None:
    """The body of the run's process; `early` is non-empty when a stop was asked for
    while the libraries loaded."""
    from workers import tasks
    from workers.settings import load_settings

    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s %(levelname)s %(name)s [run {run_id}]: %(message)s")
    report = Report(conn)

    def stop(_sig, _frame):
        tasks.SHUTDOWN.set()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if early:
        tasks.SHUTDOWN.set()
    settings = load_settings()
    fraction = cap_cuda(cap) if cap else None
    if fraction is not None:
        log.info("CUDA allocator capped at %.1f%% of device 0", 100 * fraction)
    watch_prepare(report)
    status = tasks.execute_run(run_id, settings, token)
    if status == "failed" and fraction is not None:
        record_cuda_oom(settings, run_id, cap)
    report.send(kind="done", status=status)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.run_child")
    p.add_argument("run_id", type=int)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--token", type=int, default=None)
    p.add_argument("--cap", type=int, default=None)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: _EARLY.append(1))
    signal.signal(signal.SIGINT, lambda *_: _EARLY.append(1))
    _die_with_parent(a.parent)
    from multiprocessing.connection import Connection

    child_main(a.run_id, a.token, a.cap, Connection(a.fd, readable=False), _EARLY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
