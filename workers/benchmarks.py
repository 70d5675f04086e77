"""Benchmark jobs: lm-evaluation-harness on a worker, through the same queue as runs.

A job is a row in `benchmark_jobs` (queued) before any message is sent; the message
names (job id, queue token), and only the worker that moves the job from `queued` to
`running` evaluates it (a duplicate or stale message is a no-op). The worker loads the
finished run through the engine (the base model and the run's adapter, any method:
engine.adapters.load_trained) or a base model alone (engine.models.load_model), runs
the tasks with engine.harness, and writes one `benchmark_results` row per task with
the job's end, in one transaction. A job whose worker died is failed by the reaper
(`reap_stale_benchmarks`, called where runs are reaped), never left `running`.

Tasks: any the harness knows whose data this worker has offline (the local `datasets`
cache), those in the task directories of STUDIO_BENCHMARK_TASK_DIRS (the operator's own
harness YAML, `!function` allowed there), and user tasks: harness YAML sent with the job
over an uploaded file (`upload:<stored name>`), parsed safely (no `!function`, no
`include`, no task `class`), its templates rendered in Jinja's sandbox
(engine.harness.sandbox_templates).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import db
from .benchmark_jobs import (BenchmarkRequestError, beat, cancel_job, claim_job, create_job,  # noqa: F401
                             finish_job, reap_stale_benchmarks)
from .settings import Settings
from .this_worker import Beating

log = logging.getLogger("peft_studio.benchmarks")

TASK_DIRS_ENV = "STUDIO_BENCHMARK_TASK_DIRS"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
USER_PREFIX = "user_"       # a user task's name starts with it, so it never shadows a harness task
MAX_TASKS = 20
MAX_YAML_CHARS = 20_000
USER_DATASET_LOADERS = ("json", "csv", "parquet")
REFUSED_KEYS = ("include", "class", "group", "tag", "custom_dataset", "process_docs", "process_results")
BATCH_SIZE = 8


# ---------------------------------------------------------------- checking a request

def check_task_names(tasks: Any) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise BenchmarkRequestError("tasks: a list of harness task names")
    if len(tasks) > MAX_TASKS:
        raise BenchmarkRequestError(f"tasks: {len(tasks)} tasks; at most {MAX_TASKS} in one job")
    for t in tasks:
        if not TASK_NAME.match(t):
            raise BenchmarkRequestError(f"tasks: {t[:60]!r} is not a task name (letters, digits, _ . -)")
    return list(dict.fromkeys(tasks))


def check_limit(limit: Any) -> Optional[float]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0 or limit > 1_000_000:
        raise BenchmarkRequestError(f"limit: a number of documents per task (or a fraction below 1), not {limit!r}")
    return float(limit)


def check_fewshot(n: Any) -> Optional[int]:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 64:
        raise BenchmarkRequestError(f"num_fewshot: an integer 0..64, not {n!r}")
    return n


def _data_files(cfg: dict, where: str) -> list[str]:
    kw = cfg.get("dataset_kwargs")
    files = kw.get("data_files") if isinstance(kw, dict) else None
    if isinstance(files, str):
        return [files]
    if isinstance(files, list) and files and all(isinstance(f, str) for f in files):
        return files
    if isinstance(files, dict) and files and all(isinstance(v, (str, list)) for v in files.values()):
        return [f for v in files.values() for f in ([v] if isinstance(v, str) else v) if isinstance(f, str)]
    raise BenchmarkRequestError(f"{where}.dataset_kwargs.data_files: name the uploaded file(s) the task reads "
                                f"('upload:<stored name>' from /api/datasets)")


def parse_user_task(text: Any, where: str = "user_tasks[0]") -> dict:
    """A user task's harness YAML as a checked dict (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise BenchmarkRequestError(f"{where}: harness task YAML text")
    if len(text) > MAX_YAML_CHARS:
        raise BenchmarkRequestError(f"{where}: {len(text)} characters; at most {MAX_YAML_CHARS}")
    try:
        cfg = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        tag = getattr(e, "problem", "") or ""
        raise BenchmarkRequestError(f"{where}: YAML tags are not allowed in uploaded tasks ({tag.strip()}); "
                                    f"`!function` runs code and is refused") from None
    except yaml.YAMLError as e:
        raise BenchmarkRequestError(f"{where}: not valid YAML ({str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise BenchmarkRequestError(f"{where}: a YAML mapping of harness task keys")
    name = cfg.get("task")
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise BenchmarkRequestError(f"{where}.task: a task name (letters, digits, _ . -)")
    if not name.startswith(USER_PREFIX):
        raise BenchmarkRequestError(f"{where}.task: name it {USER_PREFIX}<something> ({name!r} does not start with "
                                    f"{USER_PREFIX!r}), so that it never shadows a harness task")
    for k in REFUSED_KEYS:
        if k in cfg:
            raise BenchmarkRequestError(f"{where}.{k}: not allowed in an uploaded task")
    if cfg.get("dataset_path") not in USER_DATASET_LOADERS:
        raise BenchmarkRequestError(f"{where}.dataset_path: one of {', '.join(USER_DATASET_LOADERS)} (the file "
                                    f"format of the upload)")
    if cfg.get("dataset_name") is not None:
        raise BenchmarkRequestError(f"{where}.dataset_name: not used with an uploaded file")
    for f in _data_files(cfg, where):
        if not f.startswith("upload:"):
            raise BenchmarkRequestError(f"{where}.dataset_kwargs.data_files: {f[:80]!r} is not an upload; "
                                        f"upload the file through /api/datasets and name it 'upload:<stored name>'")
    return cfg


def check_user_tasks(items: Any, settings: Settings) -> list[dict]:
    """[{"name", "config"}] of the request's user tasks, their uploads known to the database."""
    from .datasets import check_dataset_path, upload_name

    if items is None:
        return []
    if not isinstance(items, list) or len(items) > MAX_TASKS:
        raise BenchmarkRequestError(f"user_tasks: a list of at most {MAX_TASKS} harness task YAML texts")
    out = []
    for i, text in enumerate(items):
        cfg = parse_user_task(text, f"user_tasks[{i}]")
        for f in _data_files(cfg, f"user_tasks[{i}]"):
            try:
                upload_name(f)
                check_dataset_path(settings, f)
            except (ValueError, LookupError) as e:
                raise BenchmarkRequestError(f"user_tasks[{i}].dataset_kwargs.data_files: "
                                            f"{str(e).split(': ', 1)[-1]}") from None
        out.append({"name": cfg["task"], "config": cfg})
    names = [u["name"] for u in out]
    if len(set(names)) != len(names):
        raise BenchmarkRequestError("user_tasks: two tasks have the same name")
    return out


def send(settings: Settings, job_id: int, token: int) -> None:
    from .queue import celery_app, ensure_broker_epoch

    try:
        ensure_broker_epoch(settings)
    except Exception as e:   # the send below reports a dead broker
        log.warning("broker epoch check failed: %s", e)
    celery_app(settings).send_task("studio.benchmark", args=[int(job_id), int(token)], queue=settings.queue)


# ---------------------------------------------------------------- running a job

def task_dirs() -> list[Path]:
    """The operator's harness task directories (STUDIO_BENCHMARK_TASK_DIRS, os.pathsep-separated)."""
    raw = os.environ.get(TASK_DIRS_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def write_user_tasks(settings: Settings, user_tasks: list[dict], dest: Path) -> None:
    """Each user task as a YAML file in `dest`, its uploads replaced by verified local copies."""
    from .datasets import resolve_dataset_path

    for i, item in enumerate(user_tasks):
        cfg = parse_user_task(yaml.safe_dump(item["config"]), f"user_tasks[{i}]")
        files = cfg["dataset_kwargs"]["data_files"]

        def local(f: str) -> str:
            return str(resolve_dataset_path(settings, f))
        if isinstance(files, str):
            files = local(files)
        elif isinstance(files, list):
            files = [local(f) for f in files]
        else:
            files = {k: (local(v) if isinstance(v, str) else [local(f) for f in v]) for k, v in files.items()}
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
        (dest / f"user_{i}_{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def load_model(settings: Settings, job: dict, workdir: Path):
    """(model, tokenizer) of the job: the run's base with its adapter, or the base alone."""
    from engine.adapters import extract_zip_safely, load_trained
    from engine.config import parse_run_config
    from engine.models import load_model as engine_load_model

    from .store import get_store

    if job["run_id"] is None:
        loaded = engine_load_model(job["model"], "causal_lm", allowed_roots=settings.model_roots,
                                   cache_dir=settings.models_dir, seed=job["seed"] or 0)
        return loaded.model.eval(), loaded.tokenizer
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, job["run_id"])
        ad = s.scalar(select(db.Adapter).where(db.Adapter.run_id == job["run_id"]))
        if run is None or ad is None or run.status != "succeeded":
            raise ValueError(f"run {job['run_id']} has no finished adapter to evaluate")
        config, key, sha = run.config, ad.key, ad.sha256
    path = get_store(settings).get_file(key, sha, suffix=".zip")
    d = extract_zip_safely(path, workdir / "adapter")
    prep = load_trained(parse_run_config(config), d, allowed_roots=settings.model_roots,
                        cache_dir=settings.models_dir)
    return prep.model.eval(), prep.tokenizer


def store_results(s: Session, job: dict, summary: dict) -> None:
    for task, r in summary.items():
        s.add(db.BenchmarkResult(job_id=job["id"], run_id=job["run_id"], model=job["model"], task=task[:200],
                                 version=None if r.get("version") is None else str(r["version"])[:40],
                                 n_samples=r.get("n_samples"), n_total=r.get("n_total"), limit=r.get("limit"),
                                 metrics=db.json_safe(r["metrics"])))


def heartbeat(settings: Settings, job_id: int) -> Beating:
    """The job's heartbeat from a background thread while the harness runs."""
    return Beating(settings, f"benchmark {job_id}", lambda s: beat(s, job_id))


def execute_benchmark(job_id: int, settings: Settings, token: Optional[int] = None) -> str:
    """Evaluate job `job_id` if this message may start it. Returns the final status."""
    from .tasks import device_report
    from .this_worker import worker_name

    url = settings.database_url
    with db.transaction(url) as s:
        if not claim_job(s, job_id, token, worker_name(), os.getpid()):
            job = s.get(db.BenchmarkJob, job_id)
            return job.status if job else "missing"
        j = s.get(db.BenchmarkJob, job_id)
        job = {"id": j.id, "run_id": j.run_id, "model": j.model, "seed": j.seed, "tasks": list(j.tasks or []),
               "user_tasks": list(j.user_tasks or []), "limit": j.limit, "num_fewshot": j.num_fewshot}
    log.info("benchmark %s: started (run %s, tasks %s)", job_id, job["run_id"], job["tasks"])
    workdir = Path(tempfile.mkdtemp(prefix=f"benchmark-{job_id}-"))
    try:
        with heartbeat(settings, job_id):
            from engine.harness import evaluate

            def phase(text: str):
                with db.transaction(url) as s:
                    beat(s, job_id, phase=text[:200])
            user_dir = workdir / "tasks"
            user_dir.mkdir()
            write_user_tasks(settings, job["user_tasks"], user_dir)
            phase("loading the model")
            model, tok = load_model(settings, job, workdir)
            device = "cuda" if device_report()["device"].startswith("cuda") else "cpu"
            model.to(device)
            names = job["tasks"] + [u["name"] for u in job["user_tasks"]]
            phase(f"evaluating: {', '.join(names)[:180]}")
            limit = job["limit"]
            summary = evaluate(model, tok, names, limit=int(limit) if limit and limit >= 1 else limit,
                               task_dirs=[*task_dirs(), user_dir],
                               batch_size=BATCH_SIZE, device=device, num_fewshot=job["num_fewshot"])
        with db.transaction(url) as s:
            if not finish_job(s, job_id, "succeeded"):
                raise RuntimeError("the job was no longer running when it finished (reaped)")
            store_results(s, job, summary)
        log.info("benchmark %s: succeeded (%s)", job_id, ", ".join(summary))
        return "succeeded"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        if isinstance(e, ValueError):     # BenchmarkError, ModelLoadError, ...: the message says it all
            msg = str(e)
        log.error("benchmark %s: failed: %s", job_id, msg)
        try:
            from .tasks import display_names
            msg = display_names(settings, msg)
            with db.transaction(url) as s:
                finish_job(s, job_id, "failed", msg[:4000])
        except Exception as e2:   # the reaper fails it by heartbeat timeout
            log.error("benchmark %s: could not record the failure: %s", job_id, e2)
        return "failed"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
