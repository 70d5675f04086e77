"""Celery tasks: turn a queued run into engine calls and record everything in the
database. The task is idempotent by run id: only the worker that moves the run
from `queued` to `running` trains it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import traceback
import uuid
import zipfile
from pathlib import Path
from typing import Optional

import yaml

from . import db
from .celery_app import app
from .settings import Settings, load_settings
from .this_worker import SHUTDOWN, Beating, device_estimate, worker_name  # noqa: F401  (tasks.SHUTDOWN is the flag)

log = logging.getLogger("peft_studio.worker")


def device_report() -> dict:
    """This worker's devices and memory, for routing and the studio's worker list:
    `device` (a name), `total_memory` / `free_memory` (bytes, what one process may
    use), `devices` (how many ranks of a distributed run it hosts) and
    `device_memory` (bytes per device, one entry per device).

    STUDIO_WORKER_MEMORY_GB caps the memory advertised per device (e.g. to share a
    GPU). STUDIO_WORKER_DEVICES sets the device count: by default the number of
    CUDA devices, or on CPU min(8, cores), where each rank is a process and the
    ranks share the machine's memory (each device is advertised with total / N)."""
    rep = _device_report()
    cap = os.environ.get("STUDIO_WORKER_MEMORY_GB")
    cap_bytes = int(float(cap) * 1024 ** 3) if cap else None
    if cap_bytes:
        rep["total_memory"] = min(rep["total_memory"] or cap_bytes, cap_bytes)
        rep["free_memory"] = min(rep["free_memory"] or cap_bytes, cap_bytes)
    n = rep.pop("_devices")
    env = os.environ.get("STUDIO_WORKER_DEVICES")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"STUDIO_WORKER_DEVICES={env!r} is not a whole number") from None
        if n < 1:
            raise ValueError(f"STUDIO_WORKER_DEVICES={env!r} must be at least 1")
    per = rep.pop("_per_device")
    if per is None or rep["device"] == "cpu":     # CPU ranks share one memory
        per = [rep["total_memory"] // n if rep["total_memory"] else None] * n
    else:
        per = (per + [per[-1]] * n)[:n]
        if cap_bytes:
            per = [min(p, cap_bytes) for p in per]
    rep["devices"], rep["device_memory"] = n, per
    return rep


def _device_report() -> dict:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        n = torch.cuda.device_count()
        per = [int(torch.cuda.get_device_properties(i).total_memory) for i in range(n)]
        return {"device": f"cuda:{torch.cuda.get_device_name(0)}", "total_memory": int(total),
                "free_memory": int(free), "_devices": n, "_per_device": per}
    n = max(1, min(8, os.cpu_count() or 1))
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES") * size
        return {"device": "cpu", "total_memory": int(pages * size), "free_memory": int(avail),
                "_devices": n, "_per_device": None}
    except (ValueError, OSError):
        return {"device": "cpu", "total_memory": None, "free_memory": None, "_devices": n, "_per_device": None}


def model_card(cfg: dict, result: dict, run_id: int, peft_format: bool) -> str:
    """README.md of the adapter zip: what it is, its config and metrics, how to load it."""
    method = cfg["method"]["name"]
    load = (
        "```python\n"
        "from peft import PeftModel\n"
        f"from transformers import {'AutoModelForSequenceClassification' if cfg['task'] == 'classification' else 'AutoModelForCausalLM'}\n\n"
        f"base = {'AutoModelForSequenceClassification' if cfg['task'] == 'classification' else 'AutoModelForCausalLM'}"
        f".from_pretrained(BASE_MODEL_DIR)  # the base model: {cfg['model']}\n"
        "model = PeftModel.from_pretrained(base, 'path/to/this/unzipped/folder')\n```\n"
        if peft_format else
        "This method has no Hugging Face `peft` equivalent; load it with PEFT Studio's engine:\n\n"
        "```python\nfrom engine.adapters import load_own_adapter\n```\n")
    metrics = "\n".join(f"| {k} | {v} |" for k, v in result.items() if not isinstance(v, (dict, list)))
    return (f"# {cfg['name']} — {method} adapter (PEFT Studio run {run_id})\n\n"
            f"Base model: `{cfg['model']}` · task: {cfg['task']} · method: `{method}`\n\n"
            f"## How to load\n\n{load}\n## Results\n\n| metric | value |\n|---|---|\n{metrics}\n\n"
            f"## Run config\n\n```yaml\n{yaml.safe_dump(cfg, sort_keys=False)}```\n")


def write_zip(path: str | Path, files: dict[str, bytes]) -> None:
    """A zip on disk (not in memory); weights are stored, text is deflated."""
    with zipfile.ZipFile(path, "w") as z:
        for name in sorted(files):
            kind = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
            z.writestr(name, files[name], compress_type=kind)


def publish_adapter(settings: Settings, prep, cfg: dict, result_dict: dict, history: list, run_id: int,
                    on_phase=None):
    """The adapter zip (weights, model-card README, run config, metrics) put into the
    artifact store. `prep` is the Prepared run, or the adapter's files by name (a
    distributed run's rank 0 wrote them). `on_phase(text)` hears 'saving' and then
    'uploading'. Returns (Stored, file names)."""
    from engine import phases
    from engine.adapters import adapter_files

    from .store import get_store

    if on_phase is not None:
        on_phase(phases.SAVING)
    files = dict(prep) if isinstance(prep, dict) else adapter_files(prep)
    files["README.md"] = model_card(cfg, result_dict, run_id, "adapter_config.json" in files).encode()
    files["run_config.yaml"] = yaml.safe_dump(cfg, sort_keys=False).encode()
    files["metrics.jsonl"] = "".join(json.dumps(h) + "\n" for h in history).encode()
    store = get_store(settings)
    fd, tmp = tempfile.mkstemp(prefix=f".adapter-{run_id}-", suffix=".zip", dir=store.scratch_dir())
    os.close(fd)
    names = sorted(files)
    try:
        write_zip(tmp, files)
        del files
        if on_phase is not None:
            on_phase(phases.UPLOADING)
        obj = store.put_file(f"runs/{int(run_id)}/adapter-{uuid.uuid4().hex[:12]}.zip", tmp)
    finally:
        os.unlink(tmp)
    return obj, names


class PhaseWriter:
    """A run's `phase` column from the engine's phase texts (engine.phases): a new kind of
    phase (loading, preparing data, training, evaluating, saving, ...) is written at once,
    progress within one kind at most once a second; each is also a log line."""

    def __init__(self, beat, run_id: int, interval_s: float = 1.0):
        self.beat, self.run_id, self.interval_s = beat, run_id, interval_s
        self.kind: Optional[str] = None
        self.last = 0.0

    def __call__(self, text: str) -> None:
        kind, now = text.split(":", 1)[0], time.monotonic()
        if kind == self.kind and now - self.last < self.interval_s:
            return
        self.kind, self.last = kind, now
        self.beat(phase=text[:200])
        log.info("run %s: %s", self.run_id, text)


def config_fault(error: BaseException, training_started: bool) -> bool:
    """Whether a run failed on what its config asks for (a missing column, a model that
    does not exist, targets the model lacks), so that running it again cannot succeed:
    a ValueError (ConfigError, DataError, ModelLoadError, TargetModulesError, a metric the
    data cannot score, ...) raised before the first training step finished."""
    return isinstance(error, ValueError) and not training_started


class RunMonitor(Beating):
    """Heartbeats for a running run and a cancel flag, from a background thread."""

    def __init__(self, settings: Settings, run_id: int):
        self.run_id, self.cancel = run_id, threading.Event()
        super().__init__(settings, f"run {run_id}", self._beat)

    def _beat(self, s) -> None:
        db.heartbeat(s, self.run_id)
        if db.cancel_requested(s, self.run_id):
            self.cancel.set()


def with_db_retry(fn, *, what: str, budget_s: float = 120.0):
    """Run a database write, retrying while the server is unreachable (restarts,
    failovers); writes are idempotent, so a retry never duplicates a row."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    delay, deadline = 0.5, time.monotonic() + budget_s
    while True:
        try:
            return fn()
        except (OperationalError, DBAPIError) as e:
            if isinstance(e, DBAPIError) and not isinstance(e, OperationalError) and not e.connection_invalidated:
                raise
            if time.monotonic() > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def metrics_history(url: str, run_id: int) -> list[dict]:
    from sqlalchemy import select

    with db.transaction(url) as s:
        rows = s.scalars(select(db.Metric).where(db.Metric.run_id == run_id).order_by(db.Metric.step))
        return [{"step": m.step, "loss": m.loss, "lr": m.lr, "tokens_per_s": m.tokens_per_s, "elapsed_s": m.elapsed_s,
                 "eta_s": m.eta_s, "epoch": m.epoch, "eval": m.eval} for m in rows]


def store_device_estimate(url: str, run_id: int, cfg, model_config, device: str) -> None:
    """Replace the run's stored estimate (made at submit for a CUDA device) by one for
    this worker's device kind. `estimated_peak_bytes` keeps the submit figure: it is
    what routed the run and what a requeue routes it by. A model config the
    estimator cannot read leaves the submit estimate, which says it is for CUDA."""
    try:
        est = device_estimate(cfg, model_config, device)
    except (ValueError, NotImplementedError) as e:
        log.warning("run %s: no %s estimate (%s: %s); the stored estimate stays the CUDA one from submit",
                    run_id, device, type(e).__name__, e)
        return

    def write():
        with db.transaction(url) as s:
            run = s.get(db.Run, run_id)
            if run is not None:
                run.estimate = db.json_safe(est)
    with_db_retry(write, what=f"run {run_id}: estimate")


def drop_metrics_after(url: str, run_id: int, step: int) -> None:
    """Steps after the checkpoint are trained again on resume: their old rows go."""
    from sqlalchemy import delete

    with db.transaction(url) as s:
        s.execute(delete(db.Metric).where(db.Metric.run_id == run_id, db.Metric.step > step))


def execute_run(run_id: int, settings: Optional[Settings] = None, token: Optional[int] = None) -> str:
    """Train run `run_id` if this message may start it. Returns the final status."""
    from engine.config import parse_run_config
    from engine.prepare import prepare_run
    from engine.train import train

    from .checkpoints import delete_checkpoint, load_checkpoint, save_checkpoint

    settings = settings or load_settings()
    url = settings.database_url
    me = worker_name()
    dev = device_report()["device"]

    def claim():
        with db.transaction(url) as s:
            if not db.claim_run(s, run_id, host=me, pid=os.getpid(), device=dev, token=token):
                run = s.get(db.Run, run_id)
                return None, (run.status if run else "missing")
            return s.get(db.Run, run_id).config, None

    cfg_dict, skipped = with_db_retry(claim, what=f"run {run_id}: claim")
    if cfg_dict is None:
        log.info("run %s: not started by this message (status %s, token %s)", run_id, skipped, token)
        return skipped
    log.info("run %s: started on %s (%s)", run_id, me, dev)
    from .tracking import open_mirror
    mirror = open_mirror(settings, run_id, cfg_dict)   # trackers (MLflow, TensorBoard, W&B); never blocks training
    started = [False]   # a training step finished: a failure after it is not the config's
    try:
        cfg = parse_run_config(cfg_dict)
        resume = load_checkpoint(settings, run_id)
        if resume is not None:
            log.info("run %s: resuming from the checkpoint at step %s", run_id, resume["step"])
            with_db_retry(lambda: drop_metrics_after(url, run_id, resume["step"]), what=f"run {run_id}: resume")

            def mark_resumed():
                with db.transaction(url) as s:
                    db.heartbeat(s, run_id, resumed_from_step=int(resume["step"]))
            with_db_retry(mark_resumed, what=f"run {run_id}: resume")
        else:
            with_db_retry(lambda: drop_metrics_after(url, run_id, 0), what=f"run {run_id}: restart")
        with RunMonitor(settings, run_id) as mon:
            from .datasets import resolve_dataset_path
            prepare_kwargs = dict(allowed_roots=settings.model_roots, cache_dir=settings.models_dir,
                                  path_resolver=lambda p: resolve_dataset_path(settings, p),
                                  max_data_bytes=settings.max_upload_bytes,
                                  data_cache_dir=settings.data_dir / "data-cache")

            def beat(**values):
                def write():
                    with db.transaction(url) as s:
                        db.heartbeat(s, run_id, **values)
                with_db_retry(write, what=f"run {run_id}: progress")

            phase = PhaseWriter(beat, run_id)

            def on_step_dict(m: dict):
                row = {k: m.get(k) for k in ("step", "loss", "lr", "tokens_per_s", "elapsed_s", "eta_s", "epoch",
                                              "eval")}
                with_db_retry(lambda: db.add_metric(url, run_id, row), what=f"run {run_id}: metrics")
                mirror.log_step(row)
                beat(steps_done=m["step"], max_steps=m.get("max_steps"), final_loss=m.get("loss"),
                     tokens_per_s=m.get("tokens_per_s"))

            def on_step(m):
                started[0] = True
                on_step_dict(m.to_dict())

            def on_checkpoint(step, state):
                save_checkpoint(settings, run_id, state)
                log.info("run %s: checkpoint at step %s", run_id, step)

            def should_stop():
                return mon.cancel.is_set() or SHUTDOWN.is_set()

            if cfg.training.distributed.world_size > 1:
                from .distributed_runs import run_distributed

                def on_ranks(places: list[dict]):
                    beat(ranks=db.json_safe(places))
                    log.info("run %s: ranks at %s", run_id, places)

                started[0] = True   # the ranks load and check the run themselves
                result, prep = run_distributed(settings, run_id, cfg, resume, on_step=on_step_dict,
                                               on_checkpoint=on_checkpoint, should_stop=should_stop,
                                               on_ranks=on_ranks, prepare_kwargs=prepare_kwargs)
                store_device_estimate(url, run_id, cfg, cfg.model, dev)
            else:
                from engine.data import format_progress

                def on_data_progress(stage: str, done: int, total: int):
                    text = format_progress(stage, done, total)
                    if done >= total and total:   # the last one of a stage is always written
                        phase.kind = None
                    phase(text)

                prep = prepare_run(cfg, on_data_progress=on_data_progress, on_phase=phase, **prepare_kwargs)
                beat(n_params=prep.n_params, n_trainable=prep.n_trainable)
                store_device_estimate(url, run_id, cfg, prep.model.config.to_dict(), dev)
                result = train(prep, on_step=on_step, should_stop=should_stop, resume_state=resume,
                               on_checkpoint=on_checkpoint, on_phase=phase)
        rd = result.to_dict()
        if result.cancelled and not mon.cancel.is_set():
            # this worker is shutting down: keep the progress and give the run back to the queue
            if result.last_state is not None:
                save_checkpoint(settings, run_id, result.last_state)
            from .queue import requeue_run
            requeue_run(settings, run_id, ("running",),
                        reason=f"worker {me} shut down at step {result.steps}; will resume from there")
            log.info("run %s: worker shutting down, requeued at step %s", run_id, result.steps)
            return "queued"
        if result.cancelled:
            def finish_cancelled():
                with db.transaction(url) as s:
                    db.finish_run(s, run_id, "cancelled", error="cancelled by request", results=db.json_safe(rd),
                                  steps_done=result.steps, duration_s=result.duration_s)
            with_db_retry(finish_cancelled, what=f"run {run_id}: finish")
            if result.last_state is not None:
                save_checkpoint(settings, run_id, result.last_state)
            log.info("run %s: cancelled at step %s", run_id, result.steps)
            return "cancelled"
        history = with_db_retry(lambda: metrics_history(url, run_id), what=f"run {run_id}: history")
        obj, names = publish_adapter(settings, prep, cfg.to_dict(), rd, history, run_id,
                                     on_phase=lambda text: with_db_retry(
                                         lambda: _set_phase(url, run_id, text), what=f"run {run_id}: phase"))
        replaced = []

        def finish_ok():
            with db.transaction(url) as s:
                replaced[:] = [db.store_adapter(s, run_id, obj.key, obj.size, obj.sha256, names)]
                ok = db.finish_run(
                    s, run_id, "succeeded", results=db.json_safe(rd), measured_peak_bytes=result.peak_memory_bytes,
                    memory_kind=result.memory_kind, final_loss=result.final_loss, best_metric=result.best_metric,
                    metric_name=result.metric_name, tokens_per_s=result.tokens_per_s, duration_s=result.duration_s,
                    steps_done=result.steps, max_steps=result.max_steps, n_params=result.n_params,
                    n_trainable=result.n_trainable, error=None)
                if not ok:   # reaped meanwhile (e.g. heartbeats blocked): keep that verdict, drop the adapter
                    raise RuntimeError("run was no longer running when it finished")
        try:
            with_db_retry(finish_ok, what=f"run {run_id}: finish")
        except BaseException:   # not recorded: no object left behind that nothing points at
            _forget(settings, obj.key)
            raise
        for old in replaced:
            if old:
                _forget(settings, old)
        delete_checkpoint(settings, run_id)
        log.info("run %s: succeeded in %.1f s", run_id, result.duration_s)
        return "succeeded"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        log.error("run %s: failed: %s\n%s", run_id, msg, traceback.format_exc())
        if retry_lost_rank(settings, run_id, e, msg):
            return "queued"

        msg = display_names(settings, msg)   # an upload by the name it was uploaded as, not its stored key
        # a run that failed on its config is not offered a resume that cannot succeed (studio.service.resume_run)
        fault = {"failed_on": "config"} if config_fault(e, started[0]) else None

        def finish_failed():
            with db.transaction(url) as s:
                db.finish_run(s, run_id, "failed", error=msg[:4000], results=fault)
        try:
            with_db_retry(finish_failed, what=f"run {run_id}: fail")
        except Exception as e2:   # the reaper will fail it by heartbeat timeout
            log.error("run %s: could not record the failure: %s", run_id, e2)
        return "failed"
    finally:   # status, estimate, memory and adapter go to the trackers; waits at most STUDIO_TRACKING_FLUSH_S
        mirror.close()


def _set_phase(url: str, run_id: int, text: str) -> None:
    with db.transaction(url) as s:
        db.heartbeat(s, run_id, phase=text[:200])


def display_names(settings: Settings, text: str) -> str:
    """`text` with each uploaded dataset's stored key (upload:<hex>.csv, <hex>.csv) replaced
    by the file name it was uploaded as; unchanged where the database has no such upload."""
    from .datasets import upload_display_names

    try:
        return upload_display_names(settings, text)
    except Exception as e:   # a message is still worth recording with its keys in it
        log.warning("could not name the uploads in a message: %s", e)
        return text


def retry_lost_rank(settings: Settings, run_id: int, error: BaseException, msg: str) -> bool:
    """A distributed run that lost a rank goes back to the queue while it has
    training.retries left (it resumes from its last checkpoint); True if requeued."""
    from engine.distributed import DistributedError

    if not isinstance(error, DistributedError) or getattr(error, "retried_by_ray", False):
        return False
    try:
        with db.transaction(settings.database_url) as s:
            run = s.get(db.Run, run_id)
            retries = int(((run.config or {}).get("training") or {}).get("retries", 0) or 0)
            attempts = run.attempts or 0
        if attempts > retries:
            return False
        from .queue import requeue_run
        token = requeue_run(settings, run_id, ("running",),
                            reason=f"requeued (attempt {attempts} of {retries + 1}): {msg[:3000]}")
    except Exception as e2:   # recorded as failed below instead
        log.error("run %s: could not requeue after a lost rank: %s", run_id, e2)
        return False
    if token is not None:
        log.warning("run %s: a rank was lost; requeued (attempt %s of %s)", run_id, attempts, retries + 1)
    return token is not None


def _forget(settings: Settings, key: str) -> None:
    from .store import StoreError, get_store

    try:
        get_store(settings).delete(key)
    except StoreError as e:
        log.warning("an unreferenced object stays in the store: %s", e)


@app.task(name="studio.train_run", acks_late=True)
def train_run(run_id: int, token: Optional[int] = None) -> str:
    """One queued run: in this process on a one-run worker (solo pool), or in a child
    process within a memory budget on a packing worker (workers.packing)."""
    from . import packing

    token = None if token is None else int(token)
    if packing.packing():
        return packing.run_packed(int(run_id), token, app.conf.studio_settings)
    return execute_run(int(run_id), app.conf.studio_settings, token)


# ------------------------------------------------------------------ worker presence

def report_presence(settings: Settings, name: str) -> None:
    rep = device_report()
    with db.transaction(settings.database_url) as s:
        db.upsert_worker(s, name, host=db.hostname(), pid=os.getpid(), queue=settings.queue,
                         ray_address=os.environ.get("STUDIO_RAY_ADDRESS") or None, **rep)


from celery.signals import worker_shutting_down  # noqa: E402


@worker_shutting_down.connect
def _on_worker_shutdown(**_kw):
    SHUTDOWN.set()


def presence_loop(settings: Settings, name: str, stop: threading.Event) -> None:
    """Heartbeat this worker and fail runs whose workers died (any worker may reap)."""
    while True:
        try:
            report_presence(settings, name)
            from .queue import ensure_broker_epoch, reap_and_requeue
            reap_and_requeue(settings, settings.heartbeat_timeout_s)
            ensure_broker_epoch(settings)
        except Exception as e:
            log.warning("presence update failed: %s", e)
        if stop.wait(settings.heartbeat_interval_s):
            return
