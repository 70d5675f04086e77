"""The Compare tab's d90 view (studio.d90) over runs stored in a real SQLite
database: metric against the subspace dimension d on a log axis, 90% of the
full fine-tuning reference, and d90 = the smallest d that reaches it."""

from __future__ import annotations

import pytest

from studio import d90
from workers import db

DATA = {"name": "demo-sentiment"}


def config(name: str, method: dict, dataset: dict = DATA, task: str = "classification") -> dict:
    return {"name": name, "model": "minilm", "task": task, "dataset": dataset, "method": method,
            "training": {"max_steps": 10}}


def add_run(settings, cfg: dict, metric: float, n_trainable: int, status: str = "succeeded",
            metric_name: str = "accuracy") -> int:
    with db.transaction(settings.database_url) as s:
        rid = db.create_run(s, cfg).id
        assert db.claim_run(s, rid, host="test", pid=1, device="cpu")
        assert db.finish_run(s, rid, status, best_metric=metric, metric_name=metric_name,
                             n_trainable=n_trainable, n_params=22_000_000)
    return rid


def sweep(settings, metrics: dict[int, float], **kw) -> list[int]:
    return [add_run(settings, config(f"id-d{d}", {"name": "intrinsic_dimension", "d": d}, **kw), m, d + 770)
            for d, m in metrics.items()]


def test_d90_is_the_smallest_d_reaching_90_percent_of_full_fine_tuning(settings):
    full = add_run(settings, config("full", {"name": "full"}), 0.90, 22_000_000)
    lora = add_run(settings, config("lora", {"name": "lora", "r": 8}), 0.88, 150_000)
    ids = sweep(settings, {10: 0.55, 100: 0.70, 1000: 0.83, 10000: 0.86}) + [full, lora]
    failed = add_run(settings, config("id-d300", {"name": "intrinsic_dimension", "d": 300}), 0.99, 1070,
                     status="failed")
    res = d90.d90_for_ids(settings, ids + [failed, 9999])
    assert res.applies and res.metric == "accuracy"
    assert [p[0] for p in res.points] == [10, 100, 1000, 10000]       # the failed run is left out
    assert res.reference["label"] == f"#{full} full" and res.reference["metric"] == pytest.approx(0.90)
    assert res.threshold == pytest.approx(0.81)
    assert res.d90 == 1000 and not res.notes

    fig = d90.d90_figure(res)
    assert fig.layout.xaxis.type == "log"
    lines = sorted(s.y0 for s in fig.layout.shapes if s.type == "line" and s.y0 == s.y1)
    assert lines == pytest.approx([0.81, 0.90])
    star = [t for t in fig.data if t.name == "d90 = 1000"]
    assert star and list(star[0].x) == [1000]
    assert "d90 = 1000" in fig.layout.title.text


def test_no_d_reaching_the_line_is_said_not_invented(settings):
    full = add_run(settings, config("full", {"name": "full"}), 0.95, 22_000_000)
    ids = sweep(settings, {10: 0.5, 100: 0.6}) + [full]
    res = d90.d90_for_ids(settings, ids)
    assert res.applies and res.d90 is None and res.threshold == pytest.approx(0.855)
    assert any("no d reaches 90%" in n for n in res.notes)
    assert "not reached" in d90.d90_figure(res).layout.title.text


def test_without_a_reference_or_a_sweep_there_is_no_d90(settings):
    only_sweep = sweep(settings, {10: 0.5, 100: 0.6})
    res = d90.d90_for_ids(settings, only_sweep)
    assert not res.applies and res.d90 is None
    assert any("full fine-tuning" in n for n in res.notes)
    full = add_run(settings, config("full", {"name": "full"}), 0.95, 22_000_000)
    lora = add_run(settings, config("lora", {"name": "lora", "r": 8}), 0.9, 150_000)
    assert not d90.d90_for_ids(settings, [full, lora]).applies


def test_lower_is_better_metrics_and_other_data_are_flagged(settings):
    full = add_run(settings, config("full", {"name": "full"}, task="causal_lm"), 2.0, 22_000_000,
                   metric_name="eval_loss")
    ids = [add_run(settings, config(f"d{d}", {"name": "intrinsic_dimension", "d": d}, task="causal_lm"), 3.0,
                   d, metric_name="eval_loss") for d in (10, 100)]
    res = d90.d90_for_ids(settings, ids + [full])
    assert res.d90 is None and res.threshold is None and any("higher is better" in n for n in res.notes)

    full = add_run(settings, config("full2", {"name": "full"}), 0.9, 22_000_000)
    other = sweep(settings, {10: 0.85, 100: 0.88}, dataset={"name": "demo-sentiment", "max_rows": 50})
    res = d90.d90_for_ids(settings, other + [full])
    assert res.d90 == 10 and any("not on the reference's model and data" in n for n in res.notes)


def test_compare_tab_shows_the_d90_view_only_for_a_sweep_over_d(settings):
    import types

    import gradio as gr

    from studio.ui.compare_tab import CompareTab

    full = add_run(settings, config("full", {"name": "full"}), 0.90, 22_000_000)
    lora = add_run(settings, config("lora", {"name": "lora", "r": 8}), 0.88, 150_000)
    ids = sweep(settings, {10: 0.55, 100: 0.85}) + [full]
    with gr.Blocks():
        tab = CompareTab(types.SimpleNamespace(settings=settings))
    out = tab.view(ids, "step", True)
    assert out[tab.d90_group]["visible"] is True
    assert out[tab.d90_note].startswith("**d90 = 100**")
    assert out[tab.d90_plot].layout.xaxis.type == "log"
    out = tab.view([full, lora], "step", True)
    assert out[tab.d90_group]["visible"] is False and out[tab.d90_plot] is None


def test_launch_sweeps_over_d():
    from studio import service
    from studio.ui import forms

    form = {"run_name": "", "model": "minilm", "task": "classification", "method": "intrinsic_dimension",
            "extra_method": "", "ds_source": "bundled", "ds_name": "demo-sentiment", "max_rows": 0,
            "max_steps": 10, "batch": 8, "lr": 1e-2, "seq": 64, "eval_every": 5, "seed": 0}
    for f in forms.method_fields("intrinsic_dimension"):
        form[f] = forms.field_default("intrinsic_dimension", f, "minilm")
    assert {"d", "projection", "said", "projection_seed"} <= forms.method_fields("intrinsic_dimension")
    cfgs = forms.sweep_configs(form, "d: 10, 100, 1000")
    assert [c["method"]["d"] for c in cfgs] == [10, 100, 1000]
    assert len({c["name"] for c in cfgs}) == 3
    with pytest.raises(service.SubmitError, match="no subspace dimension d"):
        forms.sweep_configs({**form, "method": "lora"}, "d: 10, 100")


def test_a_run_at_the_default_d_counts(settings):
    full = add_run(settings, config("full", {"name": "full"}), 0.9, 22_000_000)
    dflt = add_run(settings, config("dflt", {"name": "intrinsic_dimension"}), 0.85, 1000)
    ids = sweep(settings, {10: 0.5}) + [dflt, full]
    res = d90.d90_for_ids(settings, ids)
    assert [p[0] for p in res.points] == [10, 1000] and res.d90 == 1000
