"""Mirroring runs to experiment trackers: MLflow, TensorBoard and Weights & Biases.

A worker mirrors each run it trains (workers.tasks.execute_run opens the mirror
after the claim, feeds it every progress row, and closes it in a `finally`):
- params: the flattened run config (`method.r`, `training.learning_rate`, ...);
- per step: `train/loss`, `train/lr`, `train/tokens_per_s`, `train/epoch`, and every
  numeric value of an evaluation as `eval/<key>` (`eval/eval_loss`, `eval/accuracy`,
  `eval/bleu`, multi-task `eval/<task>/<metric>`); lists such as `samples` are skipped;
- at the end: the estimate's rows (`estimate/<row>` in bytes), the measured peak
  (`measured_peak_bytes`, and `memory_kind`), final results, the adapter zip as an
  artifact, and the status (FINISHED, FAILED, or KILLED for a cancelled or requeued run).
Where each run went is stored on it (`runs.tracking`), and every tracker problem
becomes one warning per problem kind in the run's log (`runs.warnings`) and the
worker's log. Calls go through workers.tracking.buffer: a tracker that is down
never fails or slows training.

Which trackers: the run's own `tracking` section (engine.config.TrackingConfig),
else the worker's environment, tracker by tracker (a run's value wins):
  STUDIO_MLFLOW_URI         an MLflow tracking URI for every run (credentials, if the server needs them,
                            come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD /
                            MLFLOW_TRACKING_TOKEN in the worker's environment, never from a config)
  STUDIO_MLFLOW_EXPERIMENT  the MLflow experiment runs go to (default "peft-studio")
  STUDIO_TENSORBOARD_DIR    where event files go (default <data dir>/tensorboard, one `run-<id>` folder
                            per run); setting it turns TensorBoard on for every run (a run's
                            `tracking.tensorboard: false` turns it off)
  STUDIO_WANDB_PROJECT      a W&B project for every run (STUDIO_WANDB_ENTITY, STUDIO_WANDB_MODE
                            online|offline, default online; STUDIO_WANDB_DIR, default <data dir>/wandb)
  STUDIO_TRACKING_FLUSH_S   how long a finished run waits for its trackers to catch up (default 10 s)
A tracker whose package is missing (`pip install 'peft-studio[tracking]'`) is a warning, not an error.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from .buffer import BufferedTracker, Once, lazy, redact, wait_all

log = logging.getLogger("peft_studio.tracking")

STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "queued": "KILLED"}
TRAIN_KEYS = ("loss", "lr", "tokens_per_s", "epoch")
PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboard", "tensorboard"),
            "wandb": ("wandb", "wandb")}


class Tracker(Protocol):
    """One experiment tracker for one run. Every method runs on the tracker's own
    background thread (never the training thread) and may raise; the buffer retries."""

    name: str

    def start(self, params: dict[str, str]) -> dict:
        """Open (or reopen) the run and log its params; returns where it went (runs.tracking)."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of one step (names already sanitized, values finite floats)."""

    def finish(self, status: str, summary: dict[str, Any], artifact_path: Optional[Path]) -> None:
        """The end: summary values (numbers and strings), the adapter zip (None: no adapter), the status."""


# ------------------------------------------------------------------ settings

@dataclass(frozen=True)
class TrackingSettings:
    mlflow_uri: Optional[str]
    mlflow_experiment: str
    tensorboard_dir: Optional[Path]        # None: not on for every run
    default_tensorboard_dir: Path
    wandb_project: Optional[str]
    wandb_entity: Optional[str]
    wandb_mode: str
    wandb_dir: Path
    flush_s: float


def _env(name: str) -> Optional[str]:
    v = os.environ.get(name)
    return v.strip() if v and v.strip() else None


def tracking_settings(settings) -> TrackingSettings:
    """The worker's tracking settings from its environment (see the module docstring)."""
    data = Path(settings.data_dir)
    tb = _env("STUDIO_TENSORBOARD_DIR")
    mode = (_env("STUDIO_WANDB_MODE") or "online").lower()
    if mode not in ("online", "offline"):
        log.warning("STUDIO_WANDB_MODE=%r is not online or offline; using offline", mode)
        mode = "offline"
    try:
        flush = float(_env("STUDIO_TRACKING_FLUSH_S") or 10)
    except ValueError:
        log.warning("STUDIO_TRACKING_FLUSH_S=%r is not a number; using 10", os.environ["STUDIO_TRACKING_FLUSH_S"])
        flush = 10.0
    return TrackingSettings(
        mlflow_uri=_env("STUDIO_MLFLOW_URI"), mlflow_experiment=_env("STUDIO_MLFLOW_EXPERIMENT") or "peft-studio",
        tensorboard_dir=Path(tb).expanduser() if tb else None, default_tensorboard_dir=data / "tensorboard",
        wandb_project=_env("STUDIO_WANDB_PROJECT"), wandb_entity=_env("STUDIO_WANDB_ENTITY"), wandb_mode=mode,
        wandb_dir=Path(_env("STUDIO_WANDB_DIR") or data / "wandb").expanduser(), flush_s=max(0.0, flush))


def plan(cfg: dict, ts: TrackingSettings) -> dict:
    """The trackers a run goes to: {"mlflow": uri, "tensorboard": logdir root, "wandb": {...}}
    (absent: off). The run's `tracking` section wins over the environment, tracker by tracker."""
    own = (cfg or {}).get("tracking") or {}
    out: dict[str, Any] = {}
    uri = own.get("mlflow") or ts.mlflow_uri
    if uri:
        out["mlflow"] = uri
    tb = own.get("tensorboard")
    if tb is None:
        tb = ts.tensorboard_dir is not None
    if tb:
        out["tensorboard"] = ts.tensorboard_dir or ts.default_tensorboard_dir
    wb = own.get("wandb")
    if wb:
        out["wandb"] = {"project": wb["project"], "entity": wb.get("entity"), "mode": wb.get("mode", "online")}
    elif ts.wandb_project:
        out["wandb"] = {"project": ts.wandb_project, "entity": ts.wandb_entity, "mode": ts.wandb_mode}
    return out


# ------------------------------------------------------------------ what is mirrored

def flatten_config(cfg: dict, prefix: str = "") -> dict[str, str]:
    """{"method.r": "8", "training.learning_rate": "0.0005", ...}: nested keys joined by
    dots; strings as they are, every other value as JSON (lists, numbers, booleans)."""
    out: dict[str, str] = {}
    for k, v in (cfg or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def sanitize(name: str) -> str:
    """A metric or param name every tracker takes: letters, digits, `_-./ ` (others become `_`)."""
    return _BAD.sub("_", str(name))[:250] or "_"


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def metric_items(row: dict) -> dict[str, float]:
    """The numeric metrics of one progress row: train/<key> and eval/<key> (non-numbers skipped)."""
    out = {}
    for k in TRAIN_KEYS:
        f = _number(row.get(k))
        if f is not None:
            out[f"train/{k}"] = f
    for k, v in (row.get("eval") or {}).items():
        f = _number(v)
        if f is not None:
            out[sanitize(k if str(k).startswith("eval/") else f"eval/{k}")] = f
    return out


def summary_of(run: dict) -> dict[str, Any]:
    """The end-of-run values: the estimate's rows and counts, the measured peak, results."""
    out: dict[str, Any] = {}
    est = run.get("estimate") or {}
    for k, v in (est.get("rows") or {}).items():
        if _number(v) is not None:
            out[f"estimate/{sanitize(k)}"] = float(v)
    for k in ("n_params", "n_trainable"):
        if _number(est.get(k)) is not None:
            out[f"estimate/{k}"] = float(est[k])
    if est.get("device"):
        out["estimate/device"] = str(est["device"])
    for k in ("measured_peak_bytes", "final_loss", "best_metric", "tokens_per_s", "duration_s", "steps_done",
              "n_trainable", "n_params"):
        if _number(run.get(k)) is not None:
            out[k] = float(run[k])
    for k in ("memory_kind", "metric_name", "status"):
        if run.get(k):
            out[k] = str(run[k])
    if run.get("error"):
        out["error"] = redact(str(run["error"]))[:500]
    return out


# ------------------------------------------------------------------ building the trackers

def trackers_for(cfg: dict, settings, run_id: int, previous: Optional[dict] = None) -> tuple[list, list[str]]:
    """(trackers, problems) for run `run_id` with config `cfg` on this worker: one
    tracker per destination in `plan`, and a message for each whose package is not
    installed. `previous` is the run's stored `tracking` (a resumed run reopens it)."""
    ts = tracking_settings(settings)
    wanted = plan(cfg, ts)
    trackers, problems = [], []
    previous = previous or {}
    for name, target in wanted.items():
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            problems.append(f"{name}: tracking is on for this run, but the `{package}` package is not installed "
                            f"on this worker; install it (pip install 'peft-studio[tracking]') to mirror runs there")
            continue
        if name == "mlflow":
            from .mlflow_tracker import MlflowTracker
            trackers.append(MlflowTracker(target, ts.mlflow_experiment, run_id, cfg, previous.get("mlflow")))
        elif name == "tensorboard":
            from .tensorboard_tracker import TensorBoardTracker
            trackers.append(TensorBoardTracker(Path(target) / f"run-{int(run_id)}", cfg))
        else:
            from .wandb_tracker import WandbTracker
            trackers.append(WandbTracker(target["project"], target.get("entity"), target["mode"], ts.wandb_dir,
                                         run_id, cfg))
    return trackers, problems


# ------------------------------------------------------------------ the mirror of one run

class Mirror:
    """All trackers of one run, each behind its own buffer. `log_step` never blocks;
    `close` finishes every tracker and waits at most the flush time. Never raises."""

    def __init__(self, run_id: int, trackers: list, flush_s: float,
                 report: Callable[[str], None], record: Callable[[str, dict], None]):
        self.run_id, self.flush_s = run_id, flush_s
        self._report, self._record = report, record
        self._once = Once()
        self.buffers = [BufferedTracker(t, self._warn) for t in trackers]

    def _warn(self, tracker: str, kind: str, message: str) -> None:
        if self._once.first((tracker, kind)):
            self._report(message)

    def start(self, params: dict[str, str]) -> None:
        for b in self.buffers:
            def call(b=b):
                info = b.tracker.start(params)
                self._record(b.name, info)
            b.submit("starting the run", call)

    def log_step(self, row: dict) -> None:
        try:
            items = metric_items(row)
            step = int(row["step"])
        except Exception as e:   # a malformed row is the engine's bug, not a reason to stop training
            log.warning("run %s: progress row not mirrored: %s", self.run_id, e)
            return
        if items:
            for b in self.buffers:
                b.submit(f"logging step {step}", lambda b=b: b.tracker.log_metrics(step, items))

    def close(self, status: str, summary: dict, adapter: Optional[Callable[[], Optional[Path]]] = None) -> bool:
        """Finish every tracker with `status` (FINISHED, FAILED, KILLED) and wait for the buffers."""
        if not self.buffers:
            return True
        art = lazy(adapter or (lambda: None))
        for b in self.buffers:
            b.submit("finishing the run", lambda b=b: b.tracker.finish(status, summary, art()))
        return wait_all(self.buffers, self.flush_s)


class _NoMirror:
    buffers: list = []

    def log_step(self, row: dict) -> None:
        pass

    def close(self) -> bool:
        return True


def open_mirror(settings, run_id: int, cfg: dict):
    """The mirror of a claimed run (a no-op object when it goes to no tracker). Reading
    the plan or the database never raises out of here: problems become warnings."""
    from .. import db

    url = settings.database_url

    def report(message: str) -> None:
        message = redact(message)
        log.warning("run %s: %s", run_id, message)
        try:
            with db.transaction(url) as s:
                db.add_run_warning(s, run_id, message)
        except Exception as e:   # the worker's log still has it
            log.warning("run %s: could not store the warning: %s", run_id, e)

    def record(tracker: str, info: dict) -> None:
        try:
            with db.transaction(url) as s:
                db.set_run_tracking(s, run_id, tracker, info)
        except Exception as e:
            log.warning("run %s: could not store where %s mirrors it: %s", run_id, tracker, e)

    try:
        with db.transaction(url) as s:
            run = s.get(db.Run, run_id)
            previous = dict(run.tracking or {}) if run is not None else {}
        trackers, problems = trackers_for(cfg, settings, run_id, previous)
        flush_s = tracking_settings(settings).flush_s
    except Exception as e:
        report(f"tracking: not mirrored ({type(e).__name__}: {e})")
        return _NoMirror()
    for p in problems:
        report(p)
    if not trackers:
        return _NoMirror()
    mirror = _RunMirror(settings, run_id, trackers, flush_s, report, record)
    mirror.start(flatten_config(cfg))
    return mirror


class _RunMirror(Mirror):
    """A Mirror that reads the run's end (status, estimate, memory, adapter) from the database."""

    def __init__(self, settings, run_id, trackers, flush_s, report, record):
        super().__init__(run_id, trackers, flush_s, report, record)
        self.settings = settings
        self._tmp: Optional[str] = None

    def _adapter(self, key: str, sha: str) -> Path:
        from ..store import get_store

        local = get_store(self.settings).get_file(key, sha, suffix=".zip")
        self._tmp = tempfile.mkdtemp(prefix=f"tracking-{self.run_id}-")
        out = Path(self._tmp) / f"peft-studio-run-{int(self.run_id)}-adapter.zip"
        shutil.copyfile(local, out)
        return out

    def close(self) -> bool:   # type: ignore[override]
        from sqlalchemy import select

        from .. import db

        adapter = None
        try:
            with db.transaction(self.settings.database_url) as s:
                run = s.get(db.Run, self.run_id)
                d = db.run_to_dict(run, with_config=False) if run is not None else {"status": "failed"}
                ad = s.scalar(select(db.Adapter).where(db.Adapter.run_id == self.run_id))
                if ad is not None and d.get("status") == "succeeded":
                    key, sha = ad.key, ad.sha256
                    adapter = lambda: self._adapter(key, sha)   # noqa: E731 -- fetched by the first tracker
        except Exception as e:
            log.warning("run %s: could not read its end for the trackers: %s", self.run_id, e)
            d = {"status": "failed"}
        try:
            return super().close(STATUS.get(d.get("status"), "FAILED"), summary_of(d), adapter)
        finally:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
