"""Studies, what the UI, REST and CLI do with them: create (check the request and each
method's first trial, record the study, launch its first trials), read (trials, each
method's best run, what the plots need), list, cancel. The search itself is
studio.study_driver; the search space is studio.study_space."""

from __future__ import annotations

import logging
from typing import Optional

from sqlalchemy import select, update

from workers import db
from workers.settings import Settings

from . import service
from .study_space import StudyError, arms, better, default_params, parse_study, trial_config

log = logging.getLogger("peft_studio.studies")


def create_study(settings: Settings, body: dict, *, owner: Optional[str] = None, start: bool = True) -> int:
    """Check and record a study; with `start`, launch its first trials now. A method whose
    first trial's config is invalid fails the request (a StudyError naming the field)."""
    from .study_storage import check_schema

    spec = parse_study(body)
    check_schema(settings.database_url)
    for i, arm in enumerate(arms(spec)):
        cfg = trial_config(spec, arm, default_params(spec, arm), 0, 0)
        try:
            service.validate_config(cfg, settings)
        except service.SubmitError as e:
            msg = str(e)
            field = msg.split(":", 1)[0] if ":" in msg else ""
            where = f"methods.{i}" if field.startswith("method") else "base"
            raise StudyError(f"{where}: {msg}") from None
    with db.transaction(settings.database_url) as s:
        row = db.StudyRow(name=spec["name"], owner=owner, status="running", spec=spec)
        s.add(row)
        s.flush()
        sid = row.id
    log.info("study %s created: %s, %s, budget %s", sid, spec["base"].get("model"),
             ", ".join(a.label for a in arms(spec)), spec["budget"])
    if start:
        from .study_driver import advance

        try:
            advance(settings, sid)
        except Exception as e:   # the study is recorded; the driver thread picks it up again
            log.warning("study %s: first advance failed: %s", sid, e)
    return sid


def _row(settings: Settings, study_id: int, owner: Optional[str] = None) -> dict:
    if not 0 < study_id < 2**31:
        raise service.NotFound(f"study {study_id} not found")
    with db.transaction(settings.database_url) as s:
        row = s.get(db.StudyRow, study_id)
        if row is None or (owner is not None and row.owner != owner):
            raise service.NotFound(f"study {study_id} not found")
        return {c.name: getattr(row, c.name) for c in db.StudyRow.__table__.columns}


def _iso(v) -> Optional[str]:
    return v.isoformat() + "Z" if v is not None else None


def get_study(settings: Settings, study_id: int, owner: Optional[str] = None) -> dict:
    """The study as the REST contract has it: status, trials [{run_id, method, params,
    value, state}], best {method: {run_id, value, params}}, plus what the view shows
    (each trial's number, reason, evaluation curve and pruning step; each best run's
    trainable parameters and peak memory)."""
    row = _row(settings, study_id, owner)
    spec = row["spec"]
    with db.transaction(settings.database_url) as s:
        links = list(s.scalars(select(db.StudyTrialRow).where(db.StudyTrialRow.study_id == study_id)
                               .order_by(db.StudyTrialRow.id)))
        trials = [{"run_id": l.run_id, "method": l.arm, "method_name": l.method, "number": l.number,
                   "params": l.params, "value": l.value, "state": l.state, "reason": l.reason,
                   "curve": l.curve or [], "pruned_at_step": l.pruned_at_step} for l in links]
        run_ids = [t["run_id"] for t in trials if t["run_id"] is not None]
        runs = {r.id: r for r in s.scalars(select(db.Run).where(db.Run.id.in_(run_ids)))} if run_ids else {}
        for t in trials:
            r = runs.get(t["run_id"])
            t["run_status"] = r.status if r else None
            t["n_trainable"] = r.n_trainable if r else None
            t["peak_memory_bytes"] = (r.measured_peak_bytes or r.estimated_peak_bytes) if r else None
    best: dict[str, dict] = {}
    for t in trials:
        if t["state"] != "completed":
            continue
        cur = best.get(t["method"])
        if cur is None or better(spec["metric"], t["value"], cur["value"]):
            best[t["method"]] = {"run_id": t["run_id"], "value": t["value"], "params": t["params"],
                                 "n_trainable": t["n_trainable"], "peak_memory_bytes": t["peak_memory_bytes"]}
    budget = spec["budget"]
    return {"id": study_id, "name": row["name"], "status": row["status"], "owner": row["owner"],
            "metric": spec["metric"], "direction": "maximize" if _higher(spec["metric"]) else "minimize",
            "methods": [a.label for a in arms(spec)], "budget": budget, "pruner": spec["pruner"],
            "parallel": spec["parallel"], "created_at": _iso(row["created_at"]),
            "finished_at": _iso(row["finished_at"]), "error": row["error"], "trials": trials, "best": best,
            "spec": spec}


def _higher(metric: str) -> bool:
    from engine.config import METRIC_DIRECTION

    return METRIC_DIRECTION[metric]


def list_studies(settings: Settings, owner: Optional[str] = None, limit: int = 200) -> list[dict]:
    with db.transaction(settings.database_url) as s:
        q = select(db.StudyRow).order_by(db.StudyRow.id.desc()).limit(limit)
        if owner is not None:
            q = q.where(db.StudyRow.owner == owner)
        return [{"id": r.id, "name": r.name, "status": r.status, "metric": r.spec.get("metric"),
                 "methods": [a.label for a in arms(r.spec)], "budget": r.spec.get("budget"),
                 "created_at": _iso(r.created_at), "finished_at": _iso(r.finished_at)} for r in s.scalars(q)]


def cancel_study(settings: Settings, study_id: int, owner: Optional[str] = None) -> dict:
    """Cancel a running study: no trial is launched any more, and its queued and running
    trials' runs are cancelled (the ordinary cancel path). A finished study is left as is."""
    from .study_driver import sweep_cancelled

    _row(settings, study_id, owner)
    with db.transaction(settings.database_url) as s:
        s.execute(update(db.StudyRow).where(db.StudyRow.id == study_id, db.StudyRow.status == "running")
                  .values(status="cancelled", finished_at=db.utcnow()))
        status = s.get(db.StudyRow, study_id).status
    stopped = sweep_cancelled(settings, study_id) if status == "cancelled" else 0
    return {"id": study_id, "status": status, "runs_cancelled": stopped}


def winners(study: dict) -> list[int]:
    """One best run per method, in the study's method order (for Compare)."""
    return [study["best"][m]["run_id"] for m in study["methods"] if m in study["best"]]
