"""Multi-task runs (dataset.tasks): config rules, temperature sampling, an exactly
resumable stream, one head per classification task (each trained), per-task metrics
and their average through a real worker run, and a few methods beside LoRA."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.adapters import load_trained, save_adapter
from engine.batching import MultiTaskStream
from engine.config import ConfigError, parse_run_config
from engine.prepare import prepare_run
from engine.tasks import TaskHeads, combine_eval, task_context, task_heads, task_metric_names, temperature_probs
from engine.train import train

TOPICS = {"sport": ["goal", "match", "team", "score", "coach"], "tech": ["chip", "code", "server", "data", "disk"],
          "food": ["bread", "soup", "salad", "spice", "rice"]}


def topic_csv(path: Path, rows: int = 120) -> Path:
    """A 3-class dataset (the other task, sentiment, has 2 classes)."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "topic"])
        for _ in range(rows):
            k = rng.choice(sorted(TOPICS))
            w.writerow([" ".join(rng.choice(TOPICS[k]) for _ in range(5)), k])
    return path


def two_tasks(path: Path, method: dict, steps: int = 6, model: str = "tiny-bert", **training) -> dict:
    return {"name": "mt", "model": model, "task": "classification",
            "dataset": {"tasks": [{"name": "sentiment", "bundled": "demo-sentiment", "max_rows": 96},
                                  {"name": "topic", "path": str(path), "text_column": "sentence",
                                   "label_column": "topic"}],
                        "temperature": 2},
            "method": method,
            "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-2, "max_seq_len": 16,
                         "eval_every": 3, "eval_max_rows": 16, **training}}


# ------------------------------------------------------------------ config

def test_config_rules_name_the_field(tmp_path):
    ok = parse_run_config(two_tasks(tmp_path / "t.csv", {"name": "lora"}))
    assert ok.dataset.task_names == ["sentiment", "topic"] and ok.dataset.sampling_temperature == 2
    assert parse_run_config(ok.to_dict()) == ok                     # round trip
    assert ok.dataset.file_paths() == [("dataset.tasks.1.path", str(tmp_path / "t.csv"))]
    assert parse_run_config({**two_tasks(tmp_path / "t.csv", {"name": "lora"}),
                             "dataset": {"tasks": ok.to_dict()["dataset"]["tasks"]}}
                            ).dataset.sampling_temperature == 10.0  # the paper's T

    def err(dataset) -> str:
        with pytest.raises(ConfigError) as e:
            parse_run_config({"model": "tiny-bert", "method": {"name": "lora"}, "dataset": dataset})
        return str(e.value)

    one = {"name": "a", "bundled": "demo-sentiment"}
    assert "at least two tasks" in err({"tasks": [one]})
    assert "'a' is used twice" in err({"tasks": [one, one]})
    assert "dataset.name: not with dataset.tasks" in err({"name": "demo-sentiment", "tasks": [one, {**one, "name": "b"}]})
    assert "dataset.max_rows: not with dataset.tasks" in err({"max_rows": 5, "tasks": [one, {**one, "name": "b"}]})
    assert "dataset.temperature: only with dataset.tasks" in err({"name": "demo-sentiment", "temperature": 3})
    assert "dataset.temperature" in err({"temperature": 0.5, "tasks": [one, {**one, "name": "b"}]})
    assert "give exactly one of bundled or path" in err({"tasks": [one, {"name": "b"}]})
    assert "dataset.tasks.1.text" in err({"tasks": [one, {**one, "name": "b", "text": "x"}]})   # unknown key
    assert "dataset.tasks.1.name" in err({"tasks": [one, {**one, "name": "no spaces"}]})


# ------------------------------------------------------------------ sampling

def rows(n: int, label: int) -> list[dict]:
    return [{"input_ids": [label + 1] * (1 + i % 5), "labels": label} for i in range(n)]


def test_temperature_sampling_proportions():
    sizes = [900, 100]
    assert np.allclose(temperature_probs(sizes, 1), [0.9, 0.1])
    p10 = temperature_probs(sizes, 10)
    assert np.allclose(p10, [900 ** 0.1, 100 ** 0.1] / np.sum([900 ** 0.1, 100 ** 0.1]))
    assert 0.5 < p10[0] < 0.6                                      # near uniform at T=10
    for T in (1, 10):
        p = temperature_probs(sizes, T)
        s = MultiTaskStream([rows(900, 0), rows(100, 1)], 4, 0, seed=3, probs=p)
        drawn = []
        for _ in range(3000):
            b = s.next()
            assert int(b["labels"][0]) == s.last_task and (b["labels"] == s.last_task).all()   # one task a batch
            drawn.append(s.last_task)
        assert abs(np.mean(np.asarray(drawn) == 0) - p[0]) < 0.03, (T, np.mean(np.asarray(drawn) == 0), p)


def test_multi_task_stream_resumes_exactly():
    datas = [rows(37, 0), rows(11, 1), rows(23, 2)]
    p = temperature_probs([37, 11, 23], 3)
    straight = MultiTaskStream(datas, 4, 0, seed=5, probs=p)
    expect = [(straight.next(), straight.last_task) for _ in range(40)]
    first = MultiTaskStream(datas, 4, 0, seed=5, probs=p)
    for _ in range(17):
        first.next()
    state = json.loads(json.dumps(first.state()))                 # as a checkpoint carries it
    again = MultiTaskStream(datas, 4, 0, seed=5, probs=p)
    again.restore(state)
    for b, task in expect[17:]:
        got = again.next()
        assert again.last_task == task
        for k in b:
            assert torch.equal(got[k], b[k])
    other = MultiTaskStream(datas, 4, 0, seed=6, probs=p)
    assert [(other.next(), other.last_task)[1] for _ in range(40)] != [t for _, t in expect]


def test_combine_eval_names_and_average():
    ev = combine_eval({"a": {"eval_loss": 1.0, "accuracy": 0.5, "eval_rows": 10},
                       "b": {"eval_loss": 3.0, "accuracy": 1.0, "eval_rows": 4}})
    assert ev["eval/a/accuracy"] == 0.5 and ev["eval/b/eval_loss"] == 3.0
    assert ev["accuracy"] == 0.75 and ev["eval_loss"] == 2.0 and ev["eval_rows"] == 14
    assert task_metric_names(ev) == {"a": {"eval_loss": 1.0, "accuracy": 0.5, "eval_rows": 10},
                                     "b": {"eval_loss": 3.0, "accuracy": 1.0, "eval_rows": 4}}


# ------------------------------------------------------------------ training

def head_weights(model) -> list[torch.Tensor]:
    (heads,) = task_heads(model)
    return [h.weight.detach().clone() for h in heads.heads]


@torch.no_grad()
def task_logits(model, tok, n_tasks: int) -> list[torch.Tensor]:
    enc = tok(["the film was wonderful", "goal match team"], return_tensors="pt", padding=True)
    model.eval()
    out = []
    for i in range(n_tasks):
        with task_context(model, i):
            out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits)
    return out


def test_lora_two_tasks_trains_both_heads_reports_per_task_and_round_trips(tmp_path):
    cfg = parse_run_config(two_tasks(topic_csv(tmp_path / "topic.csv"), {"name": "lora", "r": 4}, steps=8))
    prep = prepare_run(cfg)
    (heads,) = task_heads(prep.model)
    assert isinstance(heads, TaskHeads) and [h.out_features for h in heads.heads] == [2, 3]
    assert prep.tasks.labels["topic"] == ["food", "sport", "tech"]
    before = head_weights(prep.model)
    res = train(prep)
    after = head_weights(prep.model)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))   # both heads trained
    ev = res.eval
    for task in ("sentiment", "topic"):
        assert 0.0 <= ev[f"eval/{task}/accuracy"] <= 1.0 and ev[f"eval/{task}/eval_loss"] > 0
    assert ev["accuracy"] == pytest.approx((ev["eval/sentiment/accuracy"] + ev["eval/topic/accuracy"]) / 2)
    assert [h["step"] for h in res.history if h["eval"]] == [3, 6, 8]
    want = task_logits(prep.model, prep.tokenizer, 2)
    assert [w.shape[-1] for w in want] == [2, 3]
    save_adapter(prep, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "peft_studio.json").read_text())
    assert meta["tasks"] == ["sentiment", "topic"] and meta["task_labels"]["topic"] == ["food", "sport", "tech"]
    back = load_trained(cfg, tmp_path / "ad")
    for a, b in zip(want, task_logits(back.model, back.tokenizer, 2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_resume_of_a_multi_task_run_equals_training_straight_through(tmp_path):
    cfg = parse_run_config(two_tasks(topic_csv(tmp_path / "topic.csv"), {"name": "lora", "r": 2}, steps=8,
                                     eval_every=0, checkpoint_every=3))
    straight = prepare_run(cfg)
    train(straight)
    saved = {}
    first = prepare_run(cfg)
    train(first, on_checkpoint=lambda step, st: saved.setdefault(step, st), should_stop=lambda: 3 in saved)
    assert saved[3]["data"]["draws"] == 3 and len(saved[3]["data"]["tasks"]) == 2
    second = prepare_run(cfg)
    res = train(second, resume_state=saved[3])
    assert [h["step"] for h in res.history] == list(range(4, 9))
    a = dict(straight.model.named_parameters())
    for n, p in second.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", [{"name": "ia3"}, {"name": "bitfit"}, {"name": "prefix_tuning", "num_virtual_tokens": 4}])
def test_other_methods_train_two_tasks(tmp_path, method):
    cfg = parse_run_config(two_tasks(topic_csv(tmp_path / "topic.csv"), method, steps=4))
    prep = prepare_run(cfg)
    before = head_weights(prep.model)
    res = train(prep)
    assert all(not torch.equal(a, b) for a, b in zip(before, head_weights(prep.model)))
    assert {"eval/sentiment/accuracy", "eval/topic/accuracy", "accuracy"} <= set(res.eval)


def test_causal_lm_tasks_share_the_lm_head(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": f"story number {i} ends well"}) + "\n" for i in range(40)))
    cfg = parse_run_config({"name": "lm", "model": "tiny-llama", "task": "causal_lm",
                            "dataset": {"tasks": [{"name": "instruct", "bundled": "demo-instruct", "max_rows": 40},
                                                  {"name": "stories", "path": str(path)}]},
                            "method": {"name": "lora", "r": 2},
                            "training": {"max_steps": 4, "batch_size": 4, "max_seq_len": 24, "eval_every": 0,
                                         "eval_max_rows": 8}})
    prep = prepare_run(cfg)
    assert task_heads(prep.model) == []
    res = train(prep)
    assert res.eval["eval/instruct/perplexity"] > 1 and res.eval["eval/stories/perplexity"] > 1
    assert res.eval["eval_loss"] == pytest.approx((res.eval["eval/instruct/eval_loss"]
                                                   + res.eval["eval/stories/eval_loss"]) / 2)


# ------------------------------------------------------------------ through a worker

def test_worker_run_records_per_task_metrics_and_their_average(monkeypatch, tmp_path):
    from studio import service
    from studio.runtime import prepare_database
    from workers.settings import load_settings
    from workers.tasks import execute_run

    monkeypatch.setenv("STUDIO_ARTIFACT_URL", (tmp_path / "store").as_uri())
    settings = load_settings()
    prepare_database(settings)
    csv_path = topic_csv(Path(os.environ["STUDIO_DATA_DIR"]) / "topic.csv")     # inside the allowed data root
    rid = service.submit_run(settings, two_tasks(csv_path, {"name": "lora", "r": 2}, steps=4, eval_every=2))
    assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
    run = service.get_run(settings, rid)
    assert run["metric_name"] == "accuracy" and run["best_metric"] is not None
    metrics = service.get_metrics(settings, rid)                    # what the API and the Runs tab read
    evals = [m["eval"] for m in metrics if m["eval"]]
    assert [m["step"] for m in metrics if m["eval"]] == [2, 4]
    for ev in evals:
        per = task_metric_names(ev)
        assert set(per) == {"sentiment", "topic"}
        assert ev["accuracy"] == pytest.approx((per["sentiment"]["accuracy"] + per["topic"]["accuracy"]) / 2)
    outside = two_tasks(tmp_path / "elsewhere.csv", {"name": "lora"})
    with pytest.raises(service.SubmitError, match=r"dataset\.tasks\.1\.path"):
        service.submit_run(settings, outside)


# ------------------------------------------------------------------ the studio's side

def test_launch_form_adds_datasets_as_tasks_and_charts_show_each_task():
    from studio import charts
    from studio.ui.forms import add_task, build_config, form_from_config

    form = {"run_name": "", "model": "tiny-bert", "task": "classification", "method": "lora", "ds_source": "bundled",
            "ds_name": "demo-sentiment", "max_rows": 40, "max_steps": 5, "batch": 4, "lr": 1e-3, "seq": 16,
            "eval_every": 2, "seed": 0, "r": 4, "alpha": 8, "target_modules": "query, value"}
    text = add_task("", form, "sent")
    text = add_task(text, {**form, "ds_source": "upload", "upload_path": "upload:ab/topics v2.csv",
                           "text_col": "sentence", "label_col": "topic", "max_rows": 0})
    cfg = parse_run_config(build_config({**form, "tasks_yaml": text, "temperature": 4}))
    assert cfg.dataset.task_names == ["sent", "topics-v2"] and cfg.dataset.temperature == 4
    assert cfg.dataset.tasks[1].label_column == "topic" and cfg.dataset.tasks[0].max_rows == 40
    back = form_from_config(cfg.to_dict())
    assert parse_run_config(build_config({**form, **back})).dataset == cfg.dataset      # clone into Launch
    assert "tasks" not in build_config(form)["dataset"]                                 # empty box: one dataset
    rows = [{"step": 2, "eval": {"eval/sent/accuracy": 0.5, "eval/topics-v2/accuracy": 0.7, "accuracy": 0.6}},
            {"step": 4, "eval": {"eval/sent/accuracy": 0.6, "eval/topics-v2/accuracy": 0.8, "accuracy": 0.7}}]
    fig = charts.eval_curves({"run 1": rows}, "accuracy")
    lines = {t.name: list(t.y) for t in fig.data}
    assert lines == {"run 1 · average": [0.6, 0.7], "run 1 · sent": [0.5, 0.6], "run 1 · topics-v2": [0.7, 0.8]}
