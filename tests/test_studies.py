"""Studies (issue #28): the request's checks, Optuna's storage beside our migrations on
SQLite and PostgreSQL, and the driver on real runs of the tiny BERT trained in-process
by the worker's own `execute_run`: every trial is an ordinary run, the budget is split
evenly, a stopped driver loses no trial, a weak trial is pruned and its run cancelled,
cancelling a study cancels its queued and running trials, and a trial that fits no
connected worker is never launched."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, select

from studio import service, studies
from studio.study_driver import advance
from studio.study_space import StudyError, parse_study, split_budget
from workers import db


def tiny_study(**kw) -> dict:
    body = {"name": "tiny", "methods": ["lora", "bitfit"], "budget": {"trials": 4}, "metric": "accuracy",
            "parallel": 2,
            "base": {"model": "tiny-bert", "task": "classification",
                     "dataset": {"name": "demo-sentiment", "max_rows": 96},
                     "training": {"max_steps": 4, "batch_size": 8, "max_seq_len": 24, "eval_every": 2,
                                  "eval_batches": 1}}}
    body.update(kw)
    return body


def queued_runs(settings) -> list[int]:
    return [r["id"] for r in service.list_runs(settings, status="queued")][::-1]


def run_study_in_process(settings, sid: int, max_rounds: int = 40) -> dict:
    """Drive a study the way the studio does, with the worker's execute_run standing in
    for the queue's consumer: advance, train what is queued, until the study finishes."""
    from workers.tasks import execute_run

    for _ in range(max_rounds):
        advance(settings, sid)
        st = studies.get_study(settings, sid)
        if st["status"] != "running":
            return st
        for rid in queued_runs(settings):
            execute_run(rid, settings)
    raise AssertionError(f"study {sid} did not finish: {studies.get_study(settings, sid)}")


# ------------------------------------------------------------------ the request

@pytest.mark.parametrize("change, field", [
    ({"methods": []}, "methods"),
    ({"methods": ["lora", "nope"]}, "methods.1"),
    ({"budget": {"trials": 1}}, "budget.trials"),
    ({"budget": {"trials": 4, "gpu_hours": 1}}, "budget"),
    ({"metric": "bleu"}, "metric"),
    ({"search": {"learning_rate": [0, 1]}}, "search.learning_rate"),
    ({"search": {"batch_size": [1, 2]}}, "search.batch_size"),
    ({"colour": "red"}, "study"),
    ({"metric": ["accuracy"]}, "metric"),
])
def test_a_bad_request_names_the_field(change, field):
    import re

    with pytest.raises(StudyError, match="^" + re.escape(field) + ":"):
        parse_study(tiny_study(**change))


def test_base_with_a_method_is_refused():
    body = tiny_study()
    body["base"]["method"] = {"name": "lora"}
    with pytest.raises(StudyError, match=r"^base\.method:"):
        parse_study(body)


def test_budget_split_is_even():
    assert split_budget(32, 4) == [8, 8, 8, 8]
    assert split_budget(10, 4) == [3, 3, 2, 2]
    assert sum(split_budget(33, 5)) == 33


# ------------------------------------------------------------------ storage beside our migrations

def check_coexistence(url: str) -> None:
    import optuna
    from alembic.migration import MigrationContext

    from studio.study_storage import forget_storages, get_storage
    import dataclasses

    from workers.settings import load_settings

    from alembic.script import ScriptDirectory

    db.upgrade(url)
    script = ScriptDirectory.from_config(db.alembic_config(url))
    head, before = script.get_current_head(), script.get_revision("0010").down_revision
    settings = dataclasses.replace(load_settings(), database_url=url)
    storage = get_storage(settings)
    st = optuna.create_study(storage=storage, study_name="coexist", direction="maximize")
    t = st.ask()
    t.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
    st.tell(t, 0.5)
    eng = create_engine(url)
    with eng.connect() as conn:
        # Optuna did not touch our version table: it holds our head, and only that
        assert MigrationContext.configure(conn).get_current_heads() == (head,)
        names = set(inspect(conn).get_table_names())
        assert {"studies", "trials", "version_info", "studio_studies", "studio_study_trials", "runs"} <= names
    db.upgrade(url)    # again: a no-op, Optuna's tables and trial intact
    assert len(optuna.load_study(study_name="coexist", storage=storage).trials) == 1
    forget_storages()
    db.downgrade(url, before)
    with eng.connect() as conn:
        names = set(inspect(conn).get_table_names())
        assert not ({"studies", "trials", "version_info", "studio_studies"} & names)
        assert MigrationContext.configure(conn).get_current_heads() == (before,)
    db.upgrade(url)
    assert optuna.get_all_study_names(get_storage(settings)) == []
    forget_storages()
    eng.dispose()


def test_optuna_storage_and_our_migrations_coexist_on_sqlite(tmp_path):
    check_coexistence(f"sqlite:///{tmp_path / 'c.db'}")


@pytest.mark.postgres
def test_optuna_storage_and_our_migrations_coexist_on_postgres(pg_url):
    check_coexistence(pg_url)


# ------------------------------------------------------------------ the driver on real runs

def test_a_study_runs_every_trial_as_an_ordinary_run_within_the_budget(settings):
    sid = studies.create_study(settings, tiny_study(), owner="ann")
    st = run_study_in_process(settings, sid)
    assert st["status"] == "completed", st
    assert len(st["trials"]) == 4
    assert sorted(t["method"] for t in st["trials"]) == ["bitfit", "bitfit", "lora", "lora"]
    runs = {r["id"]: r for r in service.list_runs(settings)}
    for t in st["trials"]:
        run = runs[t["run_id"]]   # an ordinary run: in Runs, owned by the study's owner, with its trial's lr
        assert run["owner"] == "ann" and run["method"] == t["method_name"]
        assert run["config"]["training"]["learning_rate"] == pytest.approx(t["params"]["learning_rate"])
        if t["state"] == "completed":
            assert run["status"] == "succeeded" and t["value"] == pytest.approx(run["best_metric"])
    assert set(st["best"]) == {"lora", "bitfit"}
    # every method's first trial is its measured default learning rate
    from engine.methods import default_learning_rate
    for m in ("lora", "bitfit"):
        first = min((t for t in st["trials"] if t["method"] == m), key=lambda t: t["number"])
        assert first["params"]["learning_rate"] == pytest.approx(default_learning_rate(m))
    assert studies.winners(st) == [st["best"]["lora"]["run_id"], st["best"]["bitfit"]["run_id"]]
    # what the view draws from it
    from studio import study_charts
    figs = [study_charts.lr_curve(st), study_charts.pruning_history(st), *study_charts.pareto_charts(st)[:2]]
    assert all(len(f.data) >= 2 for f in figs)          # a trace per method at least
    assert [row[0] for row in study_charts.best_table(st)] == ["lora", "bitfit"]


def test_a_gpu_hours_budget_stops_each_method_when_its_share_is_used(settings):
    from workers.tasks import execute_run

    sid = studies.create_study(settings, tiny_study(budget={"gpu_hours": 1e-6}))
    assert len(queued_runs(settings)) == 2          # one per method: nothing used yet
    for rid in queued_runs(settings):
        execute_run(rid, settings)
    advance(settings, sid)                          # each method has used more than its share
    st = studies.get_study(settings, sid)
    assert st["status"] == "completed" and len(st["trials"]) == 2


def test_a_driver_stopped_between_steps_loses_no_trial(settings):
    """The two places a driver can stop with half a trial done: after Optuna's ask and
    before the trial is recorded, and after the run is submitted and before it is linked."""
    from studio import study_driver
    from studio.study_space import arms

    sid = studies.create_study(settings, tiny_study(budget={"trials": 4}, parallel=1), start=False)
    spec = studies.get_study(settings, sid)["spec"]
    arm = arms(spec)[0]
    # 1. asked, never recorded: not counted, and failed in Optuna
    st = study_driver.optuna_study(settings, sid, spec, arm, 0, 2)
    st.ask()
    # 2. recorded and submitted, the link never written: found again by its run name
    real_set_link = study_driver._set_link
    def die_on_link(settings_, link_id, **values):
        if "run_id" in values:
            raise KeyboardInterrupt("the driver stops here")
        return real_set_link(settings_, link_id, **values)
    study_driver._set_link = die_on_link
    try:
        with pytest.raises(KeyboardInterrupt):
            advance(settings, sid)
    finally:
        study_driver._set_link = real_set_link
    with db.transaction(settings.database_url) as s:   # the lease of the stopped driver runs out
        s.execute(db.update(db.StudyRow).values(lease_until=db.utcnow()))
    assert len(service.list_runs(settings)) == 1
    final = run_study_in_process(settings, sid)
    assert final["status"] == "completed"
    assert len(final["trials"]) == 4 and all(t["run_id"] for t in final["trials"])
    assert len({t["run_id"] for t in final["trials"]}) == 4
    assert len(service.list_runs(settings)) == 4, "a run was launched twice"
    from engine.methods import default_learning_rate
    firsts = [t for t in final["trials"] if t["method"] == arm.label]
    assert min(firsts, key=lambda t: t["number"])["params"]["learning_rate"] == pytest.approx(
        default_learning_rate(arm.name))        # the unrecorded ask did not take the default's place
    optuna_trials = study_driver.optuna_study(settings, sid, spec, arm, 0, 2).get_trials()
    assert any(t.user_attrs.get("reason", "").startswith("the driver stopped") for t in optuna_trials)


def test_a_weak_trial_is_pruned_and_its_run_cancelled(settings):
    """Successive halving: a running trial whose first evaluation is worse than a finished
    trial's at that step is pruned; its run is cancelled through the ordinary path."""
    sid = studies.create_study(settings, tiny_study(methods=["lora"], budget={"trials": 2}, parallel=1))
    from workers.tasks import execute_run

    first = queued_runs(settings)[0]
    assert execute_run(first, settings) == "succeeded"
    advance(settings, sid)                     # tells trial 0, launches trial 1
    second = queued_runs(settings)[0]
    with db.transaction(settings.database_url) as s:   # a worker claims it and reports a poor first evaluation
        assert db.claim_run(s, second, host="w", pid=1, device="cpu")
    best = studies.get_study(settings, sid)["trials"][0]["curve"][0][1]
    db.add_metric(settings.database_url, second, {"step": 2, "loss": 1.0, "eval": {"accuracy": best - 0.2}})
    advance(settings, sid)
    st = studies.get_study(settings, sid)
    t1 = [t for t in st["trials"] if t["run_id"] == second][0]
    assert t1["state"] == "pruned" and t1["pruned_at_step"] == 2
    assert service.get_run(settings, second)["cancel_requested"] is True


def test_cancelling_a_study_cancels_its_queued_and_running_trials(settings):
    sid = studies.create_study(settings, tiny_study(budget={"trials": 6}, parallel=3))
    ids = queued_runs(settings)
    assert len(ids) == 3
    with db.transaction(settings.database_url) as s:
        assert db.claim_run(s, ids[0], host="w", pid=1, device="cpu")
    res = studies.cancel_study(settings, sid)
    assert res["status"] == "cancelled" and res["runs_cancelled"] == 3
    assert service.get_run(settings, ids[0])["cancel_requested"] is True      # running: asked to stop
    assert [service.get_run(settings, i)["status"] for i in ids[1:]] == ["cancelled", "cancelled"]
    advance(settings, sid)                                                   # nothing new is launched
    assert len(service.list_runs(settings)) == 3
    assert {t["state"] for t in studies.get_study(settings, sid)["trials"]} == {"cancelled"}


def test_a_trial_that_fits_no_worker_is_never_launched(settings):
    from engine.config import parse_run_config
    from studio.study_space import arms, default_params, trial_config

    body = tiny_study(methods=["full", "bitfit"], budget={"trials": 2})
    spec = parse_study(body)
    est = {a.name: service.estimate_for(parse_run_config(trial_config(spec, a, default_params(spec, a), 0, 0)),
                                        settings)["rows"]["total"] for a in arms(spec)}
    assert est["full"] > est["bitfit"]
    with db.transaction(settings.database_url) as s:     # the one connected worker holds bitfit, not full
        db.upsert_worker(s, "small@host", host="host", pid=1, queue="studio", device="cuda:0 small",
                         total_memory=(est["full"] + est["bitfit"]) // 2, free_memory=None)
    sid = studies.create_study(settings, body)
    st = studies.get_study(settings, sid)
    by = {t["method"]: t for t in st["trials"]}
    assert by["full"]["state"] == "not_launched" and by["full"]["run_id"] is None
    assert by["full"]["reason"].startswith("not launched: memory:")
    assert by["bitfit"]["state"] == "running" and by["bitfit"]["run_id"]
    assert [r["method"] for r in service.list_runs(settings)] == ["bitfit"]
