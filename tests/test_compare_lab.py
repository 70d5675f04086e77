"""The Runs and Compare tabs as a lab (issue #18, parts 1/2/5/6 in the UI), without a
browser: TensorBoard-style loss smoothing, the Pareto frontier of metric against
trainable parameters and peak memory, the generation metrics (BLEU, ROUGE-L, exact
match) and their samples, tracker info and warnings in a run's summary and log, and
GET /api/compare over a real SQLite database."""

from __future__ import annotations

import hashlib
import math

import pytest

from studio import charts, compare
from studio.ui import runs_tab
from workers import db


# ------------------------------------------------------------------ smoothing

def test_ema_matches_hand_computed_debiased_values():
    assert charts.ema_smooth([1.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3])
    # w = 0.6: s1 = 0.4·2 = 0.8 -> /0.4 = 2; s2 = 0.6·0.8 + 0.4·4 = 2.08 -> /0.64 = 3.25;
    # a missing value passes through and does not count; s3 = 0.6·2.08 + 0.4·6 = 3.648 -> /0.784
    out = charts.ema_smooth([2.0, 4.0, None, 6.0], 0.6)
    assert out[:2] == pytest.approx([2.0, 3.25]) and out[2] is None
    assert out[3] == pytest.approx(3.648 / 0.784)
    assert charts.ema_smooth([0.7, 0.2, 0.9], 0.0) == pytest.approx([0.7, 0.2, 0.9])     # 0 = raw
    assert charts.ema_smooth([5.0] * 4, 0.99) == pytest.approx([5.0] * 4)               # debiased: no pull to 0
    assert charts.ema_smooth([], 0.6) == []
    nan = charts.ema_smooth([1.0, float("nan"), 3.0], 0.5)
    assert math.isnan(nan[1]) and nan[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="smoothing"):
            charts.ema_smooth([1.0], bad)


def test_smoothed_loss_chart_keeps_raw_values_faintly_behind():
    rows = [{"step": i, "loss": v} for i, v in enumerate([2.0, 4.0, 1.0, 3.0], start=1)]
    raw = charts.loss_curves({"run 1": rows})
    assert list(raw.data[0].y) == [2.0, 4.0, 1.0, 3.0] and not raw.layout.shapes
    sm = charts.loss_curves({"run 1": rows, "run 2": rows[:1]}, smoothing=0.6)
    assert [t.name for t in sm.data] == ["run 1", "run 2"]                # one trace per run
    assert list(sm.data[0].y) == pytest.approx(charts.ema_smooth([2.0, 4.0, 1.0, 3.0], 0.6))
    assert list(sm.data[0].customdata) == [2.0, 4.0, 1.0, 3.0]           # raw value in the hover
    (shape,) = sm.layout.shapes                                         # a one-point run has no raw path
    assert shape.layer == "below" and shape.opacity < 1 and shape.line.color == sm.data[0].line.color
    assert shape.path == "M 1,2.0 L 2,4.0 L 3,1.0 L 4,3.0"
    assert "smoothed 0.6" in sm.layout.title.text


# ------------------------------------------------------------------ the Pareto frontier

def pts(*xy):
    return [{"id": i, "x": x, "y": y} for i, (x, y) in enumerate(xy, start=1)]


def test_pareto_front_dominance_ties_and_direction():
    # 2 beats 3 (cheaper and better); 4 is dominated by 1 (same cost, worse metric)
    p = pts((10, 0.70), (100, 0.90), (200, 0.85), (10, 0.60), (1000, 0.95))
    assert compare.pareto_front(p, higher_better=True) == [1, 2, 5]
    # lower is better (eval_loss): the same points read the other way
    assert compare.pareto_front(p, higher_better=False) == [4]
    # identical points do not dominate each other: both stay
    assert compare.pareto_front(pts((10, 0.5), (10, 0.5), (20, 0.4)), True) == [1, 2]
    # same metric, more cost: dominated
    assert compare.pareto_front(pts((10, 0.5), (20, 0.5)), True) == [1]
    # one run, none, and runs missing a value
    assert compare.pareto_front(pts((5, 0.1)), True) == [1]
    assert compare.pareto_front([], True) == []
    missing = pts((None, 0.99), (10, None), (20, 0.5), (30, float("nan")))
    assert compare.pareto_front(missing, True) == [3]


def run(i, **kw):
    r = {"id": i, "name": f"r{i}", "model": "tiny-llama", "method": "lora", "status": "succeeded",
         "metric_name": "accuracy", "best_metric": None, "n_trainable": None, "estimated_peak_bytes": None,
         "measured_peak_bytes": None, "memory_kind": None, "estimate": None}
    r.update(kw)
    return r


def test_pareto_of_runs_by_their_metric_with_memory_measured_or_estimated():
    gib = compare.GIB
    runs = [run(1, best_metric=2.0, metric_name="eval_loss", n_trainable=100, measured_peak_bytes=2 * gib,
                memory_kind="cpu_peak_rss"),
            run(2, best_metric=1.5, metric_name="eval_loss", n_trainable=1000, estimated_peak_bytes=gib),
            run(3, best_metric=1.8, metric_name="eval_loss", n_trainable=5000, measured_peak_bytes=3 * gib,
                memory_kind="cpu_peak_rss"),
            run(4, best_metric=30.0, metric_name="bleu", n_trainable=10)]       # another metric: left out
    par = compare.pareto_of(runs)
    assert par["metric"] == "eval_loss"
    assert par["front"] == {"params": [1, 2], "memory": [2]}
    mem = {p["id"]: p for p in par["points"]["memory"]}
    assert mem[1]["x"] == pytest.approx(2.0) and mem[1]["note"] == "GiB measured CPU RSS"
    assert mem[2]["note"] == "GiB estimated CUDA"                       # no measured peak: the estimate
    assert 4 not in mem
    md = compare.front_markdown(par["points"]["memory"], par["front"]["memory"], "eval_loss", "peak memory")
    assert "lower is better" in md and "| #2 r2 | lora | 1.000 GiB estimated CUDA | 1.5000 |" in md
    assert "#1 r1" not in md
    assert "no run has" in compare.front_markdown([], [], "bleu", "peak memory")
    fig = charts.metric_vs_memory(par["points"]["memory"], "eval_loss", par["front"]["memory"])
    frontier = [t for t in fig.data if t.name == "Pareto frontier"]
    assert len(frontier) == 1 and list(frontier[0].x) == [1.0]
    fig = charts.metric_vs_trainable(par["points"]["params"], "eval_loss", par["front"]["params"])
    assert fig.layout.xaxis.type == "log"
    assert [list(t.x) for t in fig.data if t.name == "Pareto frontier"] == [[100, 1000]]
    assert compare.higher_is_better("bleu") and not compare.higher_is_better("perplexity")


# ------------------------------------------------------------------ generation metrics

SAMPLES = [{"prompt": "Name a colour.", "reference": "Blue.", "output": "Red."},
           {"prompt": "2+2?", "reference": "4", "output": "4"}]


def gen_metrics():
    return [{"step": 2, "loss": 3.0, "eval": None},
            {"step": 4, "loss": 2.5, "eval": {"eval_loss": 2.4, "bleu": 10.0, "rouge_l": 0.2, "exact_match": 0.0,
                                              "gen_rows": 2, "samples": SAMPLES[:1]}},
            {"step": 8, "loss": 2.0, "eval": {"eval_loss": 2.1, "bleu": 25.0, "rouge_l": 0.4, "exact_match": 0.5,
                                              "gen_rows": 2, "samples": SAMPLES}}]


def multitask_metrics():
    return [{"step": 5, "loss": 1.0, "eval": {"eval/qa/bleu": 20.0, "eval/qa/samples": SAMPLES[:1],
                                              "eval/chat/bleu": 40.0, "eval/chat/exact_match": 1.0,
                                              "eval/chat/samples": SAMPLES[1:], "eval/qa/eval_loss": 1.0}}]


def test_generation_metrics_are_read_and_samples_listed():
    m = gen_metrics()
    assert compare.last_generation_metrics(m) == {"bleu": 25.0, "rouge_l": 0.4, "exact_match": 0.5}
    assert compare.numeric_eval(m[1]["eval"]) == {"eval_loss": 2.4, "bleu": 10.0, "rouge_l": 0.2,
                                                  "exact_match": 0.0, "gen_rows": 2}
    assert compare.sample_steps(m) == [8, 4]
    step, rows = compare.samples_table(m)
    assert step == 8 and rows == [["–", "Name a colour.", "Blue.", "Red."], ["–", "2+2?", "4", "4"]]
    assert compare.samples_table(m, 4) == (4, [["–", "Name a colour.", "Blue.", "Red."]])
    assert compare.samples_table(m, 99)[0] == 8                      # an unknown step: the latest
    assert compare.samples_table(m[:1]) == (None, [])
    assert not compare.has_generation_metrics([{"step": 1, "eval": {"eval_loss": 1.0}}])
    # multi-task: the mean over tasks when the run has no figure of its own; samples per task
    mt = multitask_metrics()
    assert compare.last_generation_metrics(mt) == {"bleu": 30.0, "exact_match": 1.0}
    assert compare.samples_table(mt)[1] == [["qa", "Name a colour.", "Blue.", "Red."], ["chat", "2+2?", "4", "4"]]


def test_generation_curves_and_table_columns():
    fig = charts.generation_curves({"run 1": gen_metrics()})
    bleu = [t for t in fig.data if t.meta == "bleu"]
    assert len(bleu) == 1 and list(bleu[0].x) == [4, 8] and list(bleu[0].y) == [10.0, 25.0]
    assert [a.text for a in fig.layout.annotations] == ["BLEU (0-100)", "ROUGE-L F (0-1)", "exact match (0-1)"]
    mt = charts.generation_curves({"run 2": multitask_metrics()})
    assert sorted(t.name for t in mt.data if t.meta == "bleu") == ["run 2 · average", "run 2 · chat", "run 2 · qa"]
    assert sum(t.showlegend for t in mt.data) == len({t.name for t in mt.data})      # one legend entry each
    col = compare.TABLE_COLUMNS.index
    row = compare.comparison_row(run(1, rank=4, n_params=1000, final_loss=1.0), gen_metrics())
    assert (row[col("BLEU")], row[col("ROUGE-L")], row[col("exact match")]) == (25.0, 0.4, 0.5)
    assert compare.comparison_row(run(2, rank=4))[col("BLEU")] is None


def test_everything_that_reads_eval_dicts_skips_samples():
    m = gen_metrics()
    log = runs_tab.run_log(run(1, created_at="2026-01-01T00:00:00+00:00"), m)
    assert "bleu=25.0000" in log and "samples" not in log and "gen_rows=2.0000" in log
    md = runs_tab.run_status_md(run(1, steps_done=8, max_steps=8, n_params=None), m)
    assert "bleu 25.0000" in md and "generation scored on 2 prompts" in md and "samples" not in md
    assert charts.task_names(multitask_metrics(), "samples") == []
    assert charts.task_names(multitask_metrics(), "bleu") == ["qa", "chat"]
    fig = charts.eval_curves({"run 1": m}, "bleu")
    assert list(fig.data[0].y) == [10.0, 25.0]
    assert [list(t.y) for t in charts.loss_curves({"r": [{"step": 1, "loss": [1]}, {"step": 2, "loss": 1.0}]}).data] \
        == [[1.0]]


# ------------------------------------------------------------------ tracker info

def test_tracking_line_and_warnings_in_time_order():
    r = run(7, created_at="2026-01-01T10:00:00+00:00", started_at="2026-01-01T10:00:05+00:00",
            finished_at="2026-01-01T10:01:00+00:00", owner="ann", worker_host="w1", device="cpu",
            warnings=[{"at": "2026-01-01T10:00:26+00:00", "message": "mlflow: connection refused; retrying"},
                      {"at": "2026-01-01T10:00:59+00:00", "message": "mlflow: 3 rows buffered"}],
            tracking={"mlflow": {"run_id": "abc123", "experiment_id": "4", "uri": "http://u:pw@127.0.0.1:5000"},
                      "tensorboard": {"logdir": "/data/tb/run-7"},
                      "wandb": {"run_id": "w9", "project": "lab", "mode": "offline", "dir": "/data/wandb"}})
    metrics = [{"step": s, "loss": 1.0, "elapsed_s": e} for s, e in ((10, 10.0), (20, 30.0), (30, 50.0))]
    lines = runs_tab.run_log(r, metrics).splitlines()
    order = [next(i for i, line in enumerate(lines) if key in line)
             for key in ("queued", "step     10", "connection refused", "step     20", "step     30",
                         "3 rows buffered", "succeeded")]
    assert order == sorted(order) and len(lines) == 8
    assert "run 7 warning: mlflow: connection refused; retrying" in lines[order[2]]
    text = runs_tab.tracking_text(r)
    assert text.startswith("tracked in: MLflow run `abc123` (experiment 4) at http://127.0.0.1:5000")
    assert "pw" not in text and "TensorBoard logdir `/data/tb/run-7`" in text
    assert "W&B run `w9` in project lab (offline, `/data/wandb`)" in text
    assert text in runs_tab.run_status_md({**r, "steps_done": 30, "max_steps": 30}, [])
    assert runs_tab.tracking_text(run(8)) == "" and runs_tab.tracking_text(run(8, tracking={})) == ""
    assert "warning" not in runs_tab.run_log(run(8, created_at="x", warnings=None), [])


# ------------------------------------------------------------------ GET /api/compare

def add_run(settings, name, best, n_trainable, measured, *, metric_name="bleu", owner=None, evals=()):
    cfg = {"name": name, "model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
           "method": {"name": "lora", "r": 4}, "training": {"max_steps": 10}}
    with db.transaction(settings.database_url) as s:
        rid = db.create_run(s, cfg, owner=owner, estimated_peak=2 * compare.GIB).id
        assert db.claim_run(s, rid, host="test", pid=1, device="cpu")
    for step, ev in evals:
        db.add_metric(settings.database_url, rid, {"step": step, "loss": 1.0, "eval": ev})
    with db.transaction(settings.database_url) as s:
        assert db.finish_run(s, rid, "succeeded", best_metric=best, metric_name=metric_name,
                             n_trainable=n_trainable, n_params=1_000_000, measured_peak_bytes=measured,
                             memory_kind="cpu_peak_rss" if measured else None)
    return rid


def test_compare_route_lists_rows_and_frontiers(settings):
    from fastapi.testclient import TestClient

    from studio.api import build_api
    from studio.auth import Auth

    gib = compare.GIB
    ev = {"bleu": 31.5, "rouge_l": 0.55, "exact_match": 0.25, "gen_rows": 4, "samples": SAMPLES}
    a = add_run(settings, "small", 20.0, 1_000, gib, evals=[(5, {**ev, "bleu": 20.0}), (10, ev)], owner="ann")
    b = add_run(settings, "big", 35.0, 10_000, None)                    # estimate only (2 GiB)
    c = add_run(settings, "worse", 15.0, 5_000, 3 * gib)                # beaten on both axes by b
    with TestClient(build_api(settings)) as client:
        r = client.get(f"/compare?run_ids={a},{b}, {c},{a}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["metric"] == "bleu"
        assert [row["id"] for row in body["runs"]] == [a, b, c]
        assert body["runs"][0]["BLEU"] == 31.5 and body["runs"][0]["ROUGE-L"] == 0.55
        assert body["runs"][1]["BLEU"] is None and body["runs"][2]["best metric"] == 15.0
        assert set(body["runs"][0]) == set(compare.TABLE_COLUMNS)
        assert body["pareto"] == {"params": [a, b], "memory": [a, b]}
        for bad in ("1,x", "", "0", "-3", "1;2", ",".join(map(str, range(1, 60)))):
            resp = client.get("/compare", params={"run_ids": bad})
            assert resp.status_code == 422 and "run_ids" in resp.text, (bad, resp.text)
        assert client.get("/compare").status_code == 422
        missing = client.get(f"/compare?run_ids={a},999999")
        assert missing.status_code == 404 and "run 999999 not found" in missing.text
        assert "/compare" in client.get("/openapi.json").json()["paths"]
    auth = Auth(users={u: hashlib.sha256(pw.encode()).hexdigest() for u, pw in (("ann", "pw-a"), ("bob", "pw-b"))})
    with TestClient(build_api(settings, auth=auth)) as client:
        assert client.get(f"/compare?run_ids={a}").status_code == 401
        assert client.get(f"/compare?run_ids={a}", auth=("ann", "pw-a")).status_code == 200
        assert client.get(f"/compare?run_ids={a}", auth=("bob", "pw-b")).status_code == 404


def test_a_real_causal_lm_run_feeds_the_generation_view(settings):
    """The engine's own evaluation dicts (tiny-llama trained in this process, 2 prompts decoded
    at each of 2 evaluations) read by the views: numbers, curves, samples, table columns."""
    from studio import service
    from studio.ui import compare_tab
    from workers.tasks import execute_run

    cfg = {"name": "gen", "model": "tiny-llama", "task": "causal_lm", "metric": "rouge_l",
           "dataset": {"name": "demo-instruct", "max_rows": 32},
           "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
           "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 48, "eval_every": 2,
                        "eval_batches": 1, "eval_generate": 2, "eval_generate_tokens": 4}}
    rid = service.submit_run(settings, cfg)
    assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
    metrics = service.get_metrics(settings, rid)
    evals = [m for m in metrics if m.get("eval")]
    assert [m["step"] for m in evals] == [2, 4]
    last = compare.last_generation_metrics(metrics)
    assert set(last) == {"bleu", "rouge_l", "exact_match"} and 0 <= last["rouge_l"] <= 1 and 0 <= last["bleu"] <= 100
    step, rows = compare.samples_table(metrics)
    assert step == 4 and len(rows) == 2 and all(len(r) == 4 and r[1] for r in rows)
    fig = charts.generation_curves({"run": metrics})
    assert [list(t.x) for t in fig.data if t.meta == "bleu"] == [[2, 4]]
    run = service.get_run(settings, rid)
    assert run["metric_name"] == "rouge_l" and run["best_metric"] == pytest.approx(
        max(m["eval"]["rouge_l"] for m in evals))
    log = runs_tab.run_log(run, metrics)
    assert "rouge_l=" in log and "bleu=" in log and "samples" not in log and "prompt" not in log
    v = compare_tab.compare_view(settings, [rid], "step", False, smoothing=0.6)
    row = dict(zip(compare.TABLE_COLUMNS, v["table"][0]))
    assert row["ROUGE-L"] == pytest.approx(round(last["rouge_l"], 4)) and row["metric"] == "rouge_l"
    assert v["generation"] is not None and v["pareto"]["front"]["params"] == [rid]
