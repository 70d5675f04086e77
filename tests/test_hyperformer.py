"""HyperFormer (engine.methods.hyperformer): config rules, the exact count for several
tasks, a 2-task run on tiny-bert that trains both heads and both task embeddings,
reports per-task metrics and round-trips its adapter, and a single-dataset run."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import load_trained, save_adapter
from engine.config import ConfigError, parse_run_config
from engine.dims import dims_of_model
from engine.methods import get_method
from engine.methods.hyperformer import HyperNet
from engine.prepare import prepare_run
from engine.tasks import current_task, task_context
from engine.train import train

from test_multitask import head_weights, task_logits, topic_csv, two_tasks

SPEC = get_method("hyperformer")


def test_config_follows_the_tasks_and_names_fields(tmp_path):
    cfg = parse_run_config(two_tasks(tmp_path / "t.csv", {"name": "hyperformer"}))
    assert cfg.method.n_tasks == 2
    assert parse_run_config(cfg.to_dict()).method.n_tasks == 2
    single = parse_run_config({"model": "tiny-bert", "dataset": {"name": "demo-sentiment"},
                               "method": {"name": "hyperformer"}})
    assert single.method.n_tasks == 1 and single.method.positions == ["attn", "ffn"]
    for method, field in [({"name": "hyperformer", "n_tasks": 3}, "method.n_tasks"),
                          ({"name": "hyperformer", "positions": []}, "method.positions"),
                          ({"name": "hyperformer", "positions": ["ffn", "ffn"]}, "method.positions"),
                          ({"name": "hyperformer", "positions": ["mlp"]}, "method.positions"),
                          ({"name": "hyperformer", "projected_dim": 0}, "method.projected_dim"),
                          ({"name": "hyperformer", "task_embeddings": 4}, "method.task_embeddings")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_run_config(two_tasks(tmp_path / "t.csv", method))
    assert SPEC.mergeable is False and SPEC.peft_export is None


def test_count_from_config_is_exact_for_two_tasks(tmp_path):
    cfg = parse_run_config(two_tasks(topic_csv(tmp_path / "topic.csv"),
                                     {"name": "hyperformer", "task_embedding_dim": 8, "projected_dim": 6,
                                      "task_hidden_dim": 10, "bottleneck_size": 4, "positions": ["ffn"]}))
    prep = prepare_run(cfg)
    heads = sum(p.numel() for n, p in prep.model.named_parameters() if n.startswith("classifier."))
    assert heads == 2 * 32 + 2 + 3 * 32 + 3          # tiny-bert: hidden 32; 2 and 3 labels
    expected = SPEC.count_trainable(dims_of_model(prep.model), cfg.method, "classification") + heads
    assert prep.n_trainable == expected
    hub = prep.model.hyperformer
    assert isinstance(hub, HyperNet) and tuple(hub.task_emb.shape) == (2, 8)


def test_two_task_run_trains_both_heads_reports_per_task_and_round_trips(tmp_path):
    cfg = parse_run_config(two_tasks(topic_csv(tmp_path / "topic.csv"),
                                     {"name": "hyperformer", "task_embedding_dim": 16, "projected_dim": 16,
                                      "task_hidden_dim": 32}, steps=8))
    prep = prepare_run(cfg)
    heads_before = head_weights(prep.model)
    emb_before = prep.model.hyperformer.task_emb.detach().clone()
    res = train(prep)
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, head_weights(prep.model)))
    emb = prep.model.hyperformer.task_emb.detach()
    assert all(not torch.equal(emb[i], emb_before[i]) for i in range(2))   # each task's embedding trained
    for task in ("sentiment", "topic"):
        assert 0.0 <= res.eval[f"eval/{task}/accuracy"] <= 1.0
    assert res.eval["accuracy"] == pytest.approx((res.eval["eval/sentiment/accuracy"]
                                                  + res.eval["eval/topic/accuracy"]) / 2)
    assert current_task(prep.model) == 0                   # the loop restores the task after each forward
    # the adapters are task-conditioned: the same head, another task embedding, other outputs
    enc = prep.tokenizer(["goal match team"], return_tensors="pt")
    prep.model.eval()
    with torch.no_grad():
        with task_context(prep.model, 1):
            own = prep.model.bert(**enc).last_hidden_state
        with task_context(prep.model, 1):
            prep.model.hyperformer.task_index = 0          # as if task 0 inside task 1's head
            other = prep.model.bert(**enc).last_hidden_state
    assert not torch.allclose(own, other)
    want = task_logits(prep.model, prep.tokenizer, 2)
    save_adapter(prep, tmp_path / "ad")
    assert (tmp_path / "ad" / "studio_adapter.safetensors").exists()
    back = load_trained(cfg, tmp_path / "ad")
    for a, b in zip(want, task_logits(back.model, back.tokenizer, 2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_single_dataset_run_has_one_task_embedding(tmp_path):
    cfg = parse_run_config({"name": "one", "model": "tiny-bert", "task": "classification",
                            "dataset": {"name": "demo-sentiment", "max_rows": 64},
                            "method": {"name": "hyperformer", "task_embedding_dim": 8, "projected_dim": 8},
                            "training": {"max_steps": 3, "batch_size": 8, "max_seq_len": 16, "eval_every": 0,
                                         "eval_max_rows": 16}})
    prep = prepare_run(cfg)
    assert prep.tasks is None and tuple(prep.model.hyperformer.task_emb.shape) == (1, 8)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters() if n.startswith("hyperformer.")}
    res = train(prep)
    assert res.steps == 3 and "accuracy" in res.eval and not any(k.startswith("eval/") for k in res.eval)
    changed = [n for n, p in prep.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert "hyperformer.task_emb" in changed and "hyperformer.gen_w.down_w" in changed
