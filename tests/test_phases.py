"""A run says what it is doing (engine.phases): the engine reports loading, training,
evaluating n / N rows and generating k / K answers; the worker writes them to the run's
`phase` (throttled), clears it when the run ends, names an upload by its own file name in
errors, and records a failure on the config so that no resume is offered. The ETA counts
the evaluations still to come; evaluations on a CPU are bounded by the run's size."""

from __future__ import annotations

import pytest

from engine import phases
from engine.config import parse_run_config
from engine.prepare import prepare_run
from engine.train import train


def cfg(model="tiny-bert", task="classification", **training):
    ds = "demo-sentiment" if task == "classification" else "demo-instruct"
    targets = ["query", "value"] if "bert" in model else ["q_proj", "v_proj"]
    return parse_run_config({
        "name": "phases", "model": model, "task": task, "dataset": {"name": ds, "max_rows": 64},
        "method": {"name": "lora", "r": 4, "target_modules": targets},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "max_seq_len": 32,
                     "eval_every": 2, "eval_generate": 0, **training}})


# ------------------------------------------------------------------ pure rules

def test_evaluation_rows_are_bounded_on_a_cpu_by_the_size_of_the_run():
    assert phases.eval_rows_bound(None, 30, 8, 1, "cuda") == 2000
    assert phases.eval_rows_bound(None, 30, 8, 1, "cpu") == 40            # 240 rows trained / 6
    assert phases.eval_rows_bound(None, 2, 2, 1, "cpu") == 32             # at least 32
    assert phases.eval_rows_bound(None, 100_000, 8, 4, "cpu") == 2000     # at most 2,000
    assert phases.eval_rows_bound(500, 30, 8, 1, "cpu") == 500            # the config's own bound wins


def test_evaluation_steps_are_every_nth_and_the_last():
    assert phases.eval_steps(0, 30, 10) == [10, 20, 30]
    assert phases.eval_steps(0, 25, 10) == [10, 20, 25]
    assert phases.eval_steps(12, 30, 10) == [20, 30]       # resumed at step 12
    assert phases.eval_steps(0, 5, 0) == [5]               # eval_every 0: the final one only


def test_the_eta_counts_the_evaluations_still_to_come():
    guesses = []

    def guess(step_s, final):
        guesses.append(final)
        return 100.0 * step_s

    eta = phases.Eta(0, 10, [5, 10], guess)
    for _ in range(2):
        eta.add_step(1.0)
    assert eta.left(2) == pytest.approx(8 * 1.0 + 2 * 100.0)     # nothing measured yet: two guesses
    for _ in range(3):
        eta.add_step(1.0)
    eta.add_eval(7.0)                                            # the evaluation at step 5 took 7 s
    assert eta.left(5) == pytest.approx(5 * 1.0 + 7.0)           # the final one as long as that one
    assert eta.left(10) == 0.0                                   # finished: nothing left
    twice = phases.Eta(0, 10, [5, 10], guess, final_ratio=2.0)   # eval_full: the final one scores more rows
    twice.add_step(1.0)
    twice.add_eval(7.0)
    assert twice.left(1) == pytest.approx(9 * 1.0 + 7.0 + 14.0)


# ------------------------------------------------------------------ the engine reports

def test_prepare_and_train_report_each_phase_with_row_counts():
    seen: list[str] = []
    prep = prepare_run(cfg(), on_phase=seen.append)
    assert seen == [phases.loading("tiny-bert")]
    seen.clear()
    train(prep, on_phase=seen.append)
    n_val = min(len(prep.data.validation), phases.eval_rows_bound(None, 4, 4, 1, "cpu"))   # 32 of 300
    assert seen[0] == "training: step 0 / 4"
    assert f"evaluating: 0 / {n_val:,} rows" in seen and f"evaluating: {n_val:,} / {n_val:,} rows" in seen
    assert "training: step 2 / 4" in seen                        # back to training after the first evaluation
    assert seen[-1] == f"evaluating: {n_val:,} / {n_val:,} rows"  # the final evaluation ends the loop


def test_generation_reports_answers_as_they_are_made():
    seen: list[str] = []
    prep = prepare_run(cfg("tiny-llama", "causal_lm", eval_generate=3, eval_generate_tokens=4, batch_size=2,
                           eval_every=0, max_steps=1))
    train(prep, on_phase=seen.append)
    gen = [s for s in seen if "generating" in s]
    assert gen == ["evaluating: generating 0 / 3 answers", "evaluating: generating 2 / 3 answers",
                   "evaluating: generating 3 / 3 answers"]


def test_the_eta_before_the_final_evaluation_includes_it():
    """Only the final evaluation (eval_every 0) over many rows: the ETA after step 1 is far more
    than the two training steps left (the old ETA said ~2 steps and then sat through the evaluation)."""
    prep = prepare_run(cfg("tiny-llama", "causal_lm", eval_every=0, max_steps=3, eval_max_rows=160))
    res = train(prep)
    first = res.history[0]
    assert first["eta_s"] > 5 * first["elapsed_s"]
    assert res.history[-1]["eta_s"] == 0.0
    assert res.eval["eval_rows"] == 160


def test_a_cpu_run_scores_a_sixth_of_its_training_rows_by_default():
    prep = prepare_run(cfg(max_steps=12, batch_size=8, eval_every=0))   # 96 rows trained -> 32 (the floor)
    res = train(prep)
    assert res.eval["eval_rows"] == min(32, len(prep.data.validation))
    prep = prepare_run(cfg(max_steps=12, batch_size=8, eval_every=0, eval_full=True))
    assert train(prep).eval["eval_rows"] == len(prep.data.validation)


def test_a_config_without_a_learning_rate_trains_with_the_methods_default():
    from engine.methods import METHODS, default_learning_rate

    c = parse_run_config({"model": "tiny-bert", "dataset": {"name": "demo-sentiment"}, "method": {"name": "ia3"}})
    assert c.training.learning_rate == default_learning_rate("ia3") == METHODS["ia3"].default_lr
    assert c.to_dict()["training"]["learning_rate"] == METHODS["ia3"].default_lr   # stored as trained
    given = parse_run_config({"model": "tiny-bert", "dataset": {"name": "demo-sentiment"}, "method": {"name": "ia3"},
                              "training": {"learning_rate": 2e-5}})
    assert given.training.learning_rate == 2e-5                                      # a given rate is kept


def test_every_method_declares_a_measured_default_learning_rate():
    from engine.methods import METHODS

    missing = [n for n, spec in METHODS.items() if spec.default_lr is None]
    assert not missing, f"methods without MethodSpec.default_lr (measure with bench/default_lr.py): {missing}"


# ------------------------------------------------------------------ the worker writes them

def test_the_phase_writer_writes_a_new_phase_at_once_and_progress_once_a_second():
    from workers.tasks import PhaseWriter

    written = []
    w = PhaseWriter(lambda **kw: written.append(kw["phase"]), run_id=1, interval_s=3600)
    for text in ["loading model m", "preparing data: 1 / 9 rows (reading)", "preparing data: 5 / 9 rows (reading)",
                 "training: step 0 / 4", "evaluating: 0 / 9 rows", "evaluating: 4 / 9 rows", "training: step 2 / 4"]:
        w(text)
    assert written == ["loading model m", "preparing data: 1 / 9 rows (reading)", "training: step 0 / 4",
                       "evaluating: 0 / 9 rows", "training: step 2 / 4"]


def upload_csv(settings, tmp_path, name: str, text: str) -> str:
    from studio import service

    src = tmp_path / name
    src.write_text(text)
    return service.save_upload(settings, name, src)["path"]


def queue_directly(settings, config: dict) -> int:
    """A run in the database as an older studio (without the launch check) would have queued it."""
    from workers import db

    with db.transaction(settings.database_url) as s:
        return db.create_run(s, config, estimate=None, estimated_peak=1).id


def test_a_run_that_fails_on_its_config_names_the_upload_clears_its_phase_and_offers_no_resume(settings, tmp_path):
    from studio import service
    from workers.tasks import execute_run

    path = upload_csv(settings, tmp_path, "my reviews.csv", "sentence,score\nnice film,1\nbad film,0\nok,1\n")
    config = parse_run_config({"name": "nolabel", "model": "tiny-bert", "dataset": {"path": path},
                               "method": {"name": "lora", "r": 2, "target_modules": ["query"]},
                               "training": {"max_steps": 2}}).to_dict()
    rid = queue_directly(settings, config)
    assert execute_run(rid, settings) == "failed"
    run = service.get_run(settings, rid)
    assert "my_reviews.csv" in run["error"] and path.removeprefix("upload:") not in run["error"]
    assert "dataset.label_column" in run["error"]
    assert run["phase"] is None                              # not "preparing data: ..." forever
    assert run["results"] == {"failed_on": "config"}
    assert "failed on its config" in service.not_resumable(run)
    with pytest.raises(service.SubmitError, match="failed on its config"):
        service.resume_run(settings, rid)


def test_launch_refuses_a_dataset_that_does_not_fit_the_task_naming_the_file(settings, tmp_path):
    from studio import service

    method = {"name": "lora", "r": 2, "target_modules": ["query"]}
    no_label = upload_csv(settings, tmp_path, "sentences.csv", "sentence,score\na,1\nb,0\nc,1\n")
    with pytest.raises(service.SubmitError) as e:
        service.submit_run(settings, {"model": "tiny-bert", "dataset": {"path": no_label}, "method": method})
    assert str(e.value).startswith("dataset.label_column: required for this task; columns in sentences.csv")
    one_class = upload_csv(settings, tmp_path, "all good.csv", "text,label\n" + "fine,pos\n" * 12)
    with pytest.raises(service.SubmitError, match=r"dataset.label_column: 'label' has only one class") as e:
        service.validate_config({"model": "tiny-bert", "dataset": {"path": one_class}, "method": method})
    text_only = upload_csv(settings, tmp_path, "notes.csv", "body\nhello\nworld\n")
    with pytest.raises(service.SubmitError, match="dataset.text_column: required for this task; columns in notes.csv"):
        service.validate_config({"model": "tiny-llama", "task": "causal_lm", "dataset": {"path": text_only},
                                 "method": {"name": "lora", "r": 2, "target_modules": ["q_proj"]}})
    good = upload_csv(settings, tmp_path, "ok.csv", "text,label\n" + "fine,pos\nbad,neg\n" * 6)
    assert service.validate_config({"model": "tiny-bert", "dataset": {"path": good}, "method": method})
    assert service.not_resumable({"status": "failed", "results": None}) is None    # other failures: resumable


def test_a_catalog_model_estimates_but_is_refused_at_launch(settings):
    from studio import checks, service

    assert checks.is_estimate_only("llama-3-8b") and not checks.is_estimate_only("minilm")
    with pytest.raises(service.SubmitError, match="model: 'llama-3-8b' is in the estimator's catalog only"):
        service.validate_config({"model": "llama-3-8b", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
                                 "method": {"name": "lora"}}, settings)


def test_launch_and_the_worker_count_parameters_from_one_source(settings):
    from studio import checks, service
    from workers.tasks import execute_run

    method = {"name": "lora", "r": 4, "target_modules": ["query", "value"]}
    counts = checks.parameter_counts("tiny-bert", "classification", method, settings)
    rid = service.submit_run(settings, {"model": "tiny-bert", "dataset": {"name": "demo-sentiment", "max_rows": 32},
                                        "method": method, "training": {"max_steps": 1, "batch_size": 4}})
    assert execute_run(rid, settings) == "succeeded"
    run = service.get_run(settings, rid)
    assert counts == (run["n_params"], run["n_trainable"])
    assert run["phase"] is None
