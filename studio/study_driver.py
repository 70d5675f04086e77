"""The study driver: `advance(settings, study_id)` moves a study one step on, from the
database alone, and `StudyDriver` calls it for every running study from a supervised
thread of the studio (the CLI's `peft-studio study` calls it too while it follows).

One advance, under a lease on the study row (two drivers never advance one study at
once; a dead driver's lease runs out):
1. recover: an Optuna trial asked for but never recorded (the driver stopped in between)
   is failed and not counted; a trial recorded as `launching` whose run was submitted but
   not linked is linked to it by its unique run name, or launched now;
2. follow each launched trial's run: every evaluation of the study's metric is reported to
   Optuna as an intermediate value (step = training step); the pruner (successive halving
   or Hyperband) may then prune the trial, whose run is cancelled through the ordinary
   cancel path; a finished run tells Optuna its best metric (or fails the trial);
3. launch: while fewer than `parallel` trials are in flight and an arm has budget left,
   ask that arm's Optuna study (TPE) for parameters and submit the trial as an ordinary run
   (service.submit_run); one the estimator says fits no connected worker is recorded as
   `not_launched` with the reason and never queued;
4. finish: every arm's budget spent and nothing in flight -> `completed`.
Every step is idempotent: a studio or worker restart in the middle loses no trial."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from typing import Optional

from sqlalchemy import func, select, update

from workers import db
from workers.settings import Settings

from . import service
from .study_space import Arm, arms, default_params, direction, split_budget, suggest, trial_config, trial_run_name

log = logging.getLogger("peft_studio.studies")

LEASE_S = 300.0
ACTIVE_LINKS = ("launching", "running")
CAPACITY_FIELDS = ("memory:", "training.distributed.world_size:")


def holder_name() -> str:
    return f"{db.hostname()}:{os.getpid()}:{threading.get_ident()}"


def _lease(settings: Settings, study_id: int, me: str) -> bool:
    now = db.utcnow()
    with db.transaction(settings.database_url) as s:
        res = s.execute(update(db.StudyRow).where(
            db.StudyRow.id == study_id, db.StudyRow.status == "running",
            (db.StudyRow.lease_owner.is_(None)) | (db.StudyRow.lease_until < now) | (db.StudyRow.lease_owner == me))
            .values(lease_owner=me, lease_until=now + dt.timedelta(seconds=LEASE_S)))
        return res.rowcount == 1


def _release(settings: Settings, study_id: int, me: str) -> None:
    with db.transaction(settings.database_url) as s:
        s.execute(update(db.StudyRow).where(db.StudyRow.id == study_id, db.StudyRow.lease_owner == me)
                  .values(lease_owner=None, lease_until=None))


def optuna_study(settings: Settings, study_id: int, spec: dict, arm: Arm, index: int, n_trials: int):
    """The arm's Optuna study in the studio's database (created on first use), with a TPE
    sampler seeded from the study's seed and how many trials exist (so a restarted driver
    does not draw the same random start again) and the study's pruner."""
    import optuna

    from .study_storage import get_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = spec["base"].get("training") or {}
    max_steps = int(base.get("max_steps") or 30)
    first_eval = int(base.get("eval_every") or 10) or max_steps
    if spec["pruner"] == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=first_eval, reduction_factor=3)
    elif spec["pruner"] == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=first_eval, max_resource=max_steps, reduction_factor=3)
    else:
        pruner = optuna.pruners.NopPruner()
    quota = n_trials if n_trials > 0 else 24
    sampler = optuna.samplers.TPESampler(
        seed=(spec["seed"] * 1_000_003 + index * 7919 + n_trials_so_far(settings, study_id, arm)) % 2**31,
        n_startup_trials=max(2, min(10, quota // 3)), constant_liar=True,
        multivariate=len(spec["search"]) > 1)
    return optuna.create_study(storage=get_storage(settings), study_name=f"studio-{study_id}-{arm.label}",
                               direction=direction(spec["metric"]), sampler=sampler, pruner=pruner,
                               load_if_exists=True)


def n_trials_so_far(settings: Settings, study_id: int, arm: Arm) -> int:
    with db.transaction(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(db.StudyTrialRow).where(
            db.StudyTrialRow.study_id == study_id, db.StudyTrialRow.arm == arm.label)) or 0


def _links(settings: Settings, study_id: int) -> list[dict]:
    with db.transaction(settings.database_url) as s:
        rows = s.scalars(select(db.StudyTrialRow).where(db.StudyTrialRow.study_id == study_id)
                         .order_by(db.StudyTrialRow.id))
        return [{c.name: getattr(r, c.name) for c in db.StudyTrialRow.__table__.columns} for r in rows]


def _set_link(settings: Settings, link_id: int, **values) -> None:
    with db.transaction(settings.database_url) as s:
        s.execute(update(db.StudyTrialRow).where(db.StudyTrialRow.id == link_id).values(**values))


def _trial_id(study, number: int) -> Optional[int]:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t._trial_id
    return None


def _tell(study, number: int, state: str, value: Optional[float] = None, reason: Optional[str] = None) -> None:
    """Finish Optuna trial `number` (idempotent: a finished trial is left as it is)."""
    from optuna.trial import TrialState

    tid = _trial_id(study, number)
    if tid is None:
        return
    frozen = study._storage.get_trial(tid)
    if frozen.state.is_finished():
        return
    if reason:
        study._storage.set_trial_user_attr(tid, "reason", reason[:1000])
    st = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}[state]
    study.tell(number, value if st == TrialState.COMPLETE else None, state=st, skip_if_finished=True)


# ------------------------------------------------------------------ one advance

def advance(settings: Settings, study_id: int) -> dict:
    """Move study `study_id` on (see the module docstring); returns
    {"status", "launched", "finished"}. Safe to call from any number of processes."""
    me = holder_name()
    with db.transaction(settings.database_url) as s:
        row = s.get(db.StudyRow, study_id)
        if row is None:
            raise service.NotFound(f"study {study_id} not found")
        status, spec, owner = row.status, row.spec, row.owner
    if status == "cancelled":
        sweep_cancelled(settings, study_id)
        return {"status": status, "launched": 0, "finished": 0}
    if status != "running" or not _lease(settings, study_id, me):
        return {"status": status, "launched": 0, "finished": 0}
    try:
        return _advance(settings, study_id, spec, owner, me)
    except Exception as e:
        log.exception("study %s: advance failed", study_id)
        raise
    finally:
        _release(settings, study_id, me)


def _advance(settings: Settings, study_id: int, spec: dict, owner: Optional[str], me: str) -> dict:
    the_arms = arms(spec)
    quotas = split_budget(spec["budget"]["trials"], len(the_arms)) if "trials" in spec["budget"] else \
        split_budget(spec["budget"]["max_trials"], len(the_arms))
    studies = {a.label: optuna_study(settings, study_id, spec, a, i, quotas[i]) for i, a in enumerate(the_arms)}
    by_label = {a.label: a for a in the_arms}
    links = _links(settings, study_id)
    finished = 0
    # 1. recover what a stopped driver left half done
    recorded = {(l["arm"], l["number"]) for l in links}
    for label, st in studies.items():
        for t in st.get_trials(deepcopy=False):
            if not t.state.is_finished() and (label, t.number) not in recorded:
                _tell(st, t.number, "fail", reason="the driver stopped before recording this trial; not counted")
    for l in links:
        if l["state"] == "launching":
            _launch_link(settings, study_id, spec, by_label[l["arm"]], l, studies[l["arm"]], owner)
    links = _links(settings, study_id)
    # 2. follow the launched trials
    for l in links:
        if l["state"] == "running" and l["run_id"] is not None:
            finished += _follow(settings, spec, l, studies[l["arm"]])
        elif l["state"] == "running":   # its run was deleted
            _set_link(settings, l["id"], state="failed", reason="its run was deleted", finished_at=db.utcnow())
            _tell(studies[l["arm"]], l["number"], "fail", reason="its run was deleted")
    # 3. launch within the budget
    launched = 0
    while True:
        links = _links(settings, study_id)
        in_flight = sum(1 for l in links if l["state"] in ACTIVE_LINKS)
        if in_flight >= spec["parallel"]:
            break
        left = arms_with_budget(settings, spec, the_arms, quotas, links)
        if not left:
            break
        if not _lease(settings, study_id, me):   # renewed between launches; lost: stop here
            break
        arm = min(left, key=lambda a: sum(1 for l in links if l["arm"] == a.label))
        _new_trial(settings, study_id, spec, arm, studies[arm.label], owner)
        launched += 1
    # 4. done?
    links = _links(settings, study_id)
    status = "running"
    if not any(l["state"] in ACTIVE_LINKS for l in links) and not arms_with_budget(settings, spec, the_arms,
                                                                                    quotas, links):
        status = "completed" if any(l["state"] == "completed" for l in links) else "failed"
        error = None if status == "completed" else "no trial completed: " + "; ".join(
            sorted({(l["reason"] or l["state"])[:200] for l in links}))[:2000]
        with db.transaction(settings.database_url) as s:
            s.execute(update(db.StudyRow).where(db.StudyRow.id == study_id, db.StudyRow.status == "running")
                      .values(status=status, finished_at=db.utcnow(), error=error))
        log.info("study %s %s", study_id, status)
    return {"status": status, "launched": launched, "finished": finished}


def arm_hours(settings: Settings, links: list[dict], label: str) -> float:
    """Worker-hours the arm's runs have used (finished runs' durations, running runs' time so far)."""
    ids = [l["run_id"] for l in links if l["arm"] == label and l["run_id"] is not None]
    if not ids:
        return 0.0
    now, total = db.utcnow(), 0.0
    with db.transaction(settings.database_url) as s:
        for st, started, fin, dur in s.execute(select(db.Run.status, db.Run.started_at, db.Run.finished_at,
                                                      db.Run.duration_s).where(db.Run.id.in_(ids))):
            if dur is not None:
                total += dur
            elif started is not None:
                total += ((fin or now) - started).total_seconds()
    return total / 3600.0


def arms_with_budget(settings: Settings, spec: dict, the_arms: list[Arm], quotas: list[int],
                     links: list[dict]) -> list[Arm]:
    """The arms that may launch another trial: fewer trials than their share of
    budget.trials; with budget.gpu_hours, fewer worker-hours used than their share (and
    fewer trials than their share of budget.max_trials)."""
    out = []
    for a, quota in zip(the_arms, quotas):
        n = sum(1 for l in links if l["arm"] == a.label)
        if n >= quota:
            continue
        if "gpu_hours" in spec["budget"] and \
                arm_hours(settings, links, a.label) >= spec["budget"]["gpu_hours"] / len(the_arms):
            continue
        out.append(a)
    return out


def _new_trial(settings: Settings, study_id: int, spec: dict, arm: Arm, study, owner: Optional[str]) -> None:
    """Ask the arm's study for a trial, record it (`launching`), then launch it."""
    first = n_trials_so_far(settings, study_id, arm) == 0
    if first:   # every arm starts from its method's measured default (an unrecorded ask does not count)
        study.enqueue_trial(default_params(spec, arm), skip_if_exists=True)
    trial = study.ask()
    params = suggest(trial, spec, arm)
    with db.transaction(settings.database_url) as s:
        link = db.StudyTrialRow(study_id=study_id, arm=arm.label, method=arm.name, number=trial.number,
                                params=params, state="launching")
        s.add(link)
        s.flush()
        link_d = {c.name: getattr(link, c.name) for c in db.StudyTrialRow.__table__.columns}
    _launch_link(settings, study_id, spec, arm, link_d, study, owner)


def _launch_link(settings: Settings, study_id: int, spec: dict, arm: Arm, link: dict, study,
                 owner: Optional[str]) -> None:
    """Submit a recorded trial's run (or find the run a stopped driver had submitted)."""
    name = trial_run_name(spec, arm, study_id, link["number"])
    with db.transaction(settings.database_url) as s:
        with_run = s.scalar(select(db.StudyTrialRow.run_id).where(db.StudyTrialRow.id == link["id"]))
        existing = with_run or s.scalar(select(db.Run.id).where(db.Run.name == name).order_by(db.Run.id.desc()))
    if existing:
        _set_link(settings, link["id"], run_id=existing, state="running")
        return
    cfg = trial_config(spec, arm, link["params"], study_id, link["number"])
    try:
        run_id = service.submit_run(settings, cfg, owner=owner)
    except service.InternalError as e:
        _set_link(settings, link["id"], state="failed", reason=str(e)[:2000], finished_at=db.utcnow())
        _tell(study, link["number"], "fail", reason=str(e))
        return
    except service.SubmitError as e:
        msg = str(e)
        fits = not msg.startswith(CAPACITY_FIELDS)
        state = "failed" if fits else "not_launched"
        reason = msg if fits else f"not launched: {msg}"
        _set_link(settings, link["id"], state=state, reason=reason[:2000], finished_at=db.utcnow())
        _tell(study, link["number"], "fail", reason=reason)
        log.info("study %s trial %s/%s %s: %s", study_id, arm.label, link["number"], state, msg)
        return
    _set_link(settings, link["id"], run_id=run_id, state="running")
    log.info("study %s trial %s/%s -> run %s %s", study_id, arm.label, link["number"], run_id, link["params"])


def eval_curve(settings: Settings, run_id: int, metric: str) -> list[list]:
    """[[step, value], ...] of the run's evaluations of `metric`."""
    out = []
    with db.transaction(settings.database_url) as s:
        for step, ev in s.execute(select(db.Metric.step, db.Metric.eval).where(
                db.Metric.run_id == run_id, db.Metric.eval.is_not(None)).order_by(db.Metric.step)):
            v = (ev or {}).get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append([int(step), float(v)])
    return out


def _follow(settings: Settings, spec: dict, link: dict, study) -> int:
    """Report a launched trial's new evaluations, prune it or finish it. Returns 1 when
    the trial finished in this call."""
    import optuna

    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, link["run_id"])
        status, best, err = run.status, run.best_metric, run.error
    curve = eval_curve(settings, link["run_id"], spec["metric"])
    tid = _trial_id(study, link["number"])
    if tid is None:
        _set_link(settings, link["id"], state="failed", reason="its Optuna trial is missing", finished_at=db.utcnow())
        return 1
    frozen = study._storage.get_trial(tid)
    prune = False
    if not frozen.state.is_finished():
        trial = optuna.trial.Trial(study, tid)
        new = [(step, value) for step, value in curve if step not in frozen.intermediate_values]
        for step, value in new:
            trial.report(value, step)
        # asked after every new evaluation, also of a run that has finished: the pruner records
        # the rungs a trial reached, which later trials are measured against
        prune = bool(new) and trial.should_prune()
    if curve != (link["curve"] or []):
        _set_link(settings, link["id"], curve=curve)
    if status == "succeeded":
        value = best if best is not None else (curve[-1][1] if curve else None)
        if value is None:
            _set_link(settings, link["id"], state="failed", reason=f"the run reported no {spec['metric']}",
                      finished_at=db.utcnow())
            _tell(study, link["number"], "fail", reason=f"no {spec['metric']}")
        else:
            _set_link(settings, link["id"], state="completed", value=float(value), finished_at=db.utcnow())
            _tell(study, link["number"], "complete", value=float(value))
        return 1
    if status in ("failed", "cancelled"):
        why = f"its run {status}" + (f": {err}" if err else "")
        _set_link(settings, link["id"], state="failed" if status == "failed" else "cancelled",
                  reason=why[:2000], finished_at=db.utcnow())
        _tell(study, link["number"], "fail", reason=why)
        return 1
    if status == "running" and prune:
        step = curve[-1][0]
        service.cancel_run(settings, link["run_id"])
        _set_link(settings, link["id"], state="pruned", value=curve[-1][1], pruned_at_step=step,
                  reason=f"pruned at step {step} ({spec['pruner'].replace('_', ' ')})", finished_at=db.utcnow())
        _tell(study, link["number"], "pruned")
        log.info("study trial %s/%s pruned at step %s (run %s cancelled)", link["arm"], link["number"], step,
                 link["run_id"])
        return 1
    return 0


def sweep_cancelled(settings: Settings, study_id: int) -> int:
    """Cancel every queued or running run of a cancelled study's trials, and close the
    trials (idempotent). Returns how many runs were asked to stop."""
    n = 0
    for l in _links(settings, study_id):
        if l["state"] not in ACTIVE_LINKS:
            continue
        if l["run_id"] is not None:
            try:
                service.cancel_run(settings, l["run_id"])
                n += 1
            except service.NotFound:
                pass
        _set_link(settings, l["id"], state="cancelled", reason="the study was cancelled", finished_at=db.utcnow())
    try:
        with db.transaction(settings.database_url) as s:
            spec = s.get(db.StudyRow, study_id).spec
        for i, a in enumerate(arms(spec)):
            st = optuna_study(settings, study_id, spec, a, i, 0)
            for t in st.get_trials(deepcopy=False):
                if not t.state.is_finished():
                    _tell(st, t.number, "fail", reason="the study was cancelled")
    except Exception as e:   # the runs are stopped either way; Optuna's bookkeeping follows next sweep
        log.warning("study %s: closing its Optuna trials failed: %s", study_id, e)
    return n


# ------------------------------------------------------------------ the supervised thread

def running_study_ids(settings: Settings) -> list[int]:
    with db.transaction(settings.database_url) as s:
        return list(s.scalars(select(db.StudyRow.id).where(db.StudyRow.status == "running")
                              .order_by(db.StudyRow.id)))


def advance_all(settings: Settings) -> int:
    n = 0
    for sid in running_study_ids(settings):
        try:
            advance(settings, sid)
            n += 1
        except Exception as e:
            log.warning("study %s: %s", sid, e)
    return n


class StudyDriver:
    """Advances every running study every `interval_s` seconds, in a daemon thread the
    studio starts with `serve`; a failed pass is logged and the next one runs."""

    def __init__(self, settings: Settings, interval_s: float = 3.0):
        self.settings, self.interval_s = settings, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="study-driver")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                advance_all(self.settings)
            except Exception as e:
                log.warning("study driver: %s", e)

    def start(self) -> "StudyDriver":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
