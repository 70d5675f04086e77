"""One battery for every registered method (engine.methods.registry.SPECS): a method
gets these checks by being registered. On the tiny random models, with the method's
default config:

(a) the trainable count from the config alone equals the count on the built model;
(b) save -> load through engine.adapters (the studio's path) gives the same outputs;
(c) a mergeable method gives the same outputs merged and unmerged, and unmerge restores;
(d) it has an activation plan, and the estimator's result for it has no "not modelled" note.
"""

from __future__ import annotations

import pytest
import torch

from engine.adapters import load_adapter, save_adapter
from engine.arch import head_modules
from engine.dims import dims_of_model
from engine.estimator import activation_plan, estimate
from engine.methods import count_parameters
from engine.methods.base import AdapterLayer, QuantizedLayer, WrapsBaseLayer
from engine.methods.registry import SPECS

from .battery import SETUPS, base_model, batch, logits, perturb_trainable, prepare

CASES = [(spec, name, task) for spec in SPECS for name, task in SETUPS]
IDS = [f"{spec.name}-{name}" for spec, name, _ in CASES]
ATOL = 1e-5


def head_count(model, task: str) -> int:
    if task != "classification":
        return 0
    return sum(p.numel() for _, h in head_modules(model) for p in h.parameters())


def test_every_method_runs_on_some_tiny_model():
    """The skips below (a method refusing a model) must leave every method tested somewhere."""
    for spec in SPECS:
        ran = []
        for name, task in SETUPS:
            try:
                prepare(spec, name, task)
                ran.append(name)
            except pytest.skip.Exception:
                pass
        assert ran, f"{spec.name} refuses every tiny model: the battery would test nothing for it"


@pytest.mark.parametrize("spec,name,task", CASES, ids=IDS)
def test_count_from_config_equals_the_built_model(spec, name, task):
    prep = prepare(spec, name, task)
    assert spec.count_trainable is not None, f"{spec.name}: no count_trainable"
    expected = spec.count_trainable(dims_of_model(prep.model), prep.config.method, task)
    if spec.trains_head:
        expected += head_count(prep.model, task)
    assert prep.n_trainable == expected > 0


@pytest.mark.parametrize("spec,name,task", CASES, ids=IDS)
def test_save_then_load_gives_the_same_outputs(spec, name, task, tmp_path):
    prep = prepare(spec, name, task)
    b = batch(name)
    base = logits(base_model(name, task), b)
    perturb_trainable(prep.model)
    trained = logits(prep.model, b)
    assert not torch.allclose(trained, base, atol=1e-3), "the perturbed adapter should change the outputs"
    save_adapter(prep, tmp_path)
    loaded = load_adapter(base_model(name, task), prep.config, tmp_path)
    torch.testing.assert_close(logits(loaded, b), trained, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec,name,task", [c for c in CASES if c[0].mergeable],
                         ids=[i for c, i in zip(CASES, IDS) if c[0].mergeable])
def test_merged_equals_unmerged(spec, name, task):
    prep = prepare(spec, name, task)
    model, b = prep.model, batch(name)
    perturb_trainable(model)
    before = logits(model, b)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert bool(layers) == spec.adds_params, "a mergeable method that adds parameters does so in AdapterLayers"
    for layer in layers:
        layer.merge()
        assert layer.merged
    torch.testing.assert_close(logits(model, b), before, atol=ATOL, rtol=0)
    for layer in layers:
        layer.unmerge()
        assert not layer.merged
    torch.testing.assert_close(logits(model, b), before, atol=ATOL, rtol=0)
    spec.merge(model)
    assert not any(isinstance(m, (WrapsBaseLayer, QuantizedLayer)) for m in model.modules())
    torch.testing.assert_close(logits(model, b), before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec,name,task", CASES, ids=IDS)
def test_estimator_models_the_method(spec, name, task):
    prep = prepare(spec, name, task)
    assert spec.plan is not None, f"{spec.name}: no activation plan for the estimator"
    dims = dims_of_model(prep.model)
    plan = activation_plan(dims, prep.config.method, task)
    assert plan == spec.plan(dims, prep.config.method, task)
    assert plan.prompt_tokens or plan.embeddings or any(lp.trains_anything() for lp in plan.layers), \
        f"{spec.name}: its plan trains nothing"
    est = estimate(prep.model.config.to_dict(), prep.config.method, task=task, batch_size=2, seq_len=16)
    assert not [n for n in est.notes if "not modelled" in n], est.notes
    assert est.n_trainable == count_parameters(prep.model)[1]
