"""engine.adapter_bank: several saved adapters on one loaded base. Each view computes
exactly what the run rebuilt from scratch computes, the base's tensors stay shared
(same storage) and unchanged, and attaching costs the adapters' bytes, not the base's."""

from __future__ import annotations

import pytest
import torch

from engine.adapter_bank import AdapterBank, BankError, model_bytes
from engine.adapters import load_base, load_trained, save_adapter
from engine.config import parse_run_config
from engine.data import Examples
from engine.measure import AllocatorPeak
from engine.methods import ApplyContext, count_parameters, get_method
from engine.prepare import Prepared, apply_method
from method_helpers import fixed_batch, logits, perturb_trainable

LABELS = ["negative", "positive"]
METHODS = {
    "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
    "ia3": {},
    "prefix_tuning": {"num_virtual_tokens": 3},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "houlsby": {"bottleneck_size": 4},
    "llama_adapter": {"adapter_len": 3, "adapter_layers": 1},
    # these write base tensors (biases; a quantized base): the bank gives them private copies
    "bitfit": {},
    "qlora": {"r": 4},
}
COMBOS = [("tiny-llama", "causal_lm"), ("tiny-bert", "classification")]
CASES = [(m, model, task) for m in METHODS for model, task in COMBOS
         if not (m == "llama_adapter" and model == "tiny-bert")]


def run_config(model: str, task: str, method: dict):
    ds = "demo-sentiment" if task == "classification" else "demo-instruct"
    return parse_run_config({"model": model, "task": task, "dataset": {"name": ds}, "method": method,
                             "training": {"max_steps": 1, "seed": 0}})


def labels_for(task: str) -> list[str]:
    return LABELS if task == "classification" else []


def saved_adapter(model: str, task: str, method: dict, out, seed: int):
    """A 'trained' adapter: the method applied to the base, its trainable weights moved
    away from their initialisation (seeded), saved the way a worker saves it."""
    cfg = run_config(model, task, method)
    lm = load_base(cfg, labels_for(task))
    spec = get_method(method["name"])
    ctx = ApplyContext(task=task, seed=0, tokenizer=lm.tokenizer)
    m = apply_method(lm.model, spec, cfg.method, ctx)
    perturb_trainable(m, 0.3, seed)
    n, t = count_parameters(m)
    save_adapter(Prepared(cfg, m, lm.tokenizer, Examples(task, [], [], labels_for(task)), spec, ctx, n, t), out)
    return cfg


@pytest.fixture(scope="module")
def banks():
    out = {}
    for model, task in COMBOS:
        lm = load_base(run_config(model, task, {"name": "lora"}), labels_for(task))
        bank = AdapterBank(lm.model, lm.tokenizer, task)
        snapshot = {n: (p.data_ptr(), p.detach().clone()) for n, p in bank.base.named_parameters()}
        out[model] = (bank, snapshot)
    return out


@pytest.mark.parametrize("method,model,task", CASES, ids=[f"{m}-{model}" for m, model, _ in CASES])
def test_a_view_equals_the_run_rebuilt_alone_and_the_base_stays_shared(banks, tmp_path, method, model, task):
    bank, snapshot = banks[model]
    cfg = saved_adapter(model, task, {"name": method, **METHODS[method]}, tmp_path, seed=len(bank.keys()) + 1)
    view = bank.attach(method, cfg, tmp_path)
    alone = load_trained(cfg, tmp_path).model
    batch = fixed_batch(bank.tokenizer, task)
    torch.testing.assert_close(logits(view.model, batch), logits(alone, batch), atol=1e-5, rtol=0)
    # the trained adapter really changes the output (else equality proves nothing)
    assert not torch.allclose(logits(view.model, batch), logits(bank.base, batch), atol=1e-4)
    # every base tensor is where it was, with the same values, after each attach
    for name, p in bank.base.named_parameters():
        ptr, value = snapshot[name]
        assert p.data_ptr() == ptr and torch.equal(p, value), name
    base_ptrs = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in bank.base.parameters()}
    view_ptrs = {p.untyped_storage().data_ptr() for p in view.model.parameters()}
    if view.shares_base:   # all but a head, biases or norms it trains are the base's own storage
        assert sum(n for ptr, n in base_ptrs.items() if ptr in view_ptrs) > 0.9 * bank.base_bytes
        assert view.own_bytes < 0.1 * bank.base_bytes
    else:   # a quantized base cannot share: its private copy is counted
        assert not base_ptrs.keys() & view_ptrs and view.own_bytes > 0.5 * bank.base_bytes
    assert method in bank and bank.view(method) is view.model


def test_views_are_independent_and_attaching_three_costs_their_adapters_not_the_base(tmp_path):
    model, task = "tiny-llama", "causal_lm"
    lm = load_base(run_config(model, task, {"name": "lora"}), [])
    bank = AdapterBank(lm.model, lm.tokenizer, task)
    methods = [("lora", METHODS["lora"]), ("prefix_tuning", METHODS["prefix_tuning"]), ("ia3", {})]
    cfgs = [saved_adapter(model, task, {"name": n, **extra}, tmp_path / n, seed=i + 1)
            for i, (n, extra) in enumerate(methods)]
    with AllocatorPeak() as alloc:
        views = [bank.attach(n, cfg, tmp_path / n) for (n, _), cfg in zip(methods, cfgs)]
    adapters = sum(v.own_bytes for v in views)
    assert bank.base_bytes == model_bytes(bank.base) > 3_000_000
    assert 0 < adapters < 0.02 * bank.base_bytes
    # what stays allocated is about the adapters; the peak (skeleton pass, loaded files) stays far below a base
    assert alloc.end < adapters + 0.05 * bank.base_bytes, (alloc.end, adapters)
    assert alloc.peak < 0.25 * bank.base_bytes, (alloc.peak, bank.base_bytes)
    assert bank.total_bytes == bank.base_bytes + adapters
    # each view equals its run alone, in any order of use (hooks of one never reach another)
    batch = fixed_batch(bank.tokenizer, task)
    outs = [logits(v.model, batch) for v in reversed(views)][::-1]
    for (n, _), cfg, out in zip(methods, cfgs, outs):
        torch.testing.assert_close(out, logits(load_trained(cfg, tmp_path / n).model, batch), atol=1e-5, rtol=0)
    bank.detach("ia3")
    assert bank.keys() == ["lora", "prefix_tuning"] and bank.total_bytes == bank.base_bytes + views[0].own_bytes \
        + views[1].own_bytes


def test_a_load_that_writes_into_the_shared_base_poisons_the_bank():
    lm = load_base(run_config("tiny-llama", "causal_lm", {"name": "lora"}), [])
    bank = AdapterBank(lm.model, lm.tokenizer, "causal_lm")

    def sneaky(m):   # writes only real tensors, so the meta skeleton does not see it
        w = m.model.norm.weight
        if w.device.type != "meta":
            w.add_(1.0)
        return m
    with pytest.raises(BankError, match="wrote into 1 shared base tensors"):
        bank.attach_with("sneaky", sneaky)
    with pytest.raises(BankError, match="must be loaded again"):
        bank.attach_with("other", lambda m: m)


def test_an_adapter_for_another_task_is_refused(tmp_path):
    cfg = saved_adapter("tiny-llama", "classification", {"name": "lora", "r": 2}, tmp_path, seed=1)
    lm = load_base(run_config("tiny-llama", "causal_lm", {"name": "lora"}), [])
    bank = AdapterBank(lm.model, lm.tokenizer, "causal_lm")
    with pytest.raises(ValueError, match="task: the adapter is for classification"):
        bank.attach("x", cfg, tmp_path)
