"""intrinsic_dimension (Aghajanyan et al. 2020): the exact trainable count, the fast
Walsh–Hadamard transform, Fastfood and dense projections agreeing where both fit,
training in the subspace, and the adapter's round trip and merge."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from engine.adapters import load_adapter, save_adapter
from engine.arch import head_modules
from engine.config import parse_run_config
from engine.dims import dims_of_model
from engine.estimator import estimate
from engine.methods import ApplyContext, count_parameters, get_method
from engine.methods.base import merge_and_unload
from engine.methods.intrinsic_dimension import (DenseProjection, FastfoodProjection, IntrinsicDimensionConfig,
                                                IntrinsicLinear, fwht, hadamard_matrix, projection_kind)
from engine.prepare import Prepared, apply_method, prepare_run
from engine.train import train
from methods.battery import base_model, batch, logits, tokenizer

SPEC = get_method("intrinsic_dimension")


def method_cfg(**kw) -> dict:
    return {"name": "intrinsic_dimension", **kw}


def prepared(model: str, task: str, **method) -> Prepared:
    cfg = parse_run_config({"model": model, "task": task,
                            "dataset": {"name": "demo-sentiment" if task == "classification" else "demo-instruct"},
                            "method": method_cfg(**method), "training": {"max_steps": 1, "seed": 0}})
    ctx = ApplyContext(task=task, seed=0, tokenizer=tokenizer(model))
    m = apply_method(base_model(model, task), SPEC, cfg.method, ctx).eval()
    n, t = count_parameters(m)
    return Prepared(cfg, m, tokenizer(m.config.name_or_path), None, SPEC, ctx, n, t)


def head_numel(model) -> int:
    return sum(p.numel() for _, h in head_modules(model) for p in h.parameters())


# ---- counts and config -----------------------------------------------------------------------------

@pytest.mark.parametrize("said", [False, True])
def test_trainable_count_is_d_plus_head_plus_said_scales(said):
    prep = prepared("tiny-bert", "classification", d=37, said=said)
    layers = [m for m in prep.model.modules() if isinstance(m, IntrinsicLinear)]
    assert len(layers) == 8 * 6                          # all-linear: every linear of the 8 blocks
    expected = 37 + (len(layers) if said else 0) + head_numel(prep.model)
    assert prep.n_trainable == expected
    assert SPEC.count_trainable(dims_of_model(prep.model), prep.config.method, "classification") \
        == 37 + (len(layers) if said else 0)
    theta = [p for n, p in prep.model.named_parameters() if n.endswith("theta_d")]
    assert len(theta) == 1 and theta[0].shape == (37,)   # one θ_d shared by every layer


def test_causal_lm_trains_exactly_d_and_estimator_agrees():
    prep = prepared("tiny-llama", "causal_lm", d=123, target_modules=["q_proj", "down_proj"])
    assert prep.n_trainable == 123
    est = estimate(prep.model.config.to_dict(), prep.config.method, task="causal_lm", batch_size=1, seq_len=8)
    assert est.n_trainable == 123


def test_config_errors_name_the_field():
    for bad, field in [({"d": 0}, "d"), ({"projection": "sparse"}, "projection"), ({"target_modules": []},
                                                                                   "target_modules")]:
        with pytest.raises(ValidationError, match=field):
            IntrinsicDimensionConfig(**bad)
    with pytest.raises(ValueError, match="method.projection"):
        prepared("tiny-bert", "classification", d=1 << 20, projection="dense")


def test_auto_is_dense_for_small_and_fastfood_for_large():
    assert projection_kind(prepared("tiny-bert", "classification", d=10).model) == "dense"
    assert projection_kind(prepared("tiny-bert", "classification", d=5000).model) == "fastfood"


# ---- the transforms --------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 2, 16, 64, 2048])
def test_fwht_is_the_hadamard_matrix(L):
    x = torch.randn(3, L, dtype=torch.float64)
    h = hadamard_matrix(L.bit_length() - 1, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h)
    torch.testing.assert_close(h @ h, L * torch.eye(L, dtype=torch.float64))


@pytest.mark.parametrize("cls", [DenseProjection, FastfoodProjection])
@pytest.mark.parametrize("rows,d", [(1500, 10), (4096, 64), (300, 700)])
def test_backward_is_the_transpose(cls, rows, d):
    proj = cls(rows, d, torch.Generator().manual_seed(3))
    P = proj.materialize()
    assert P.shape == (rows, d)
    theta, g = torch.randn(d), torch.randn(rows)
    torch.testing.assert_close(proj.forward_map(theta), P @ theta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proj.transpose_map(g), P.T @ g, atol=1e-3, rtol=1e-4)


def column_stats(P: torch.Tensor) -> tuple[float, float]:
    """(mean column norm, mean |cosine| between distinct columns)."""
    n = P.norm(dim=0)
    cos = (P.T @ P) / (n[:, None] * n[None, :])
    off = cos - torch.diag(torch.diag(cos))
    d = P.shape[1]
    return float(n.mean()), float(off.abs().sum() / (d * d - d))


def test_fastfood_and_dense_agree_on_a_model_small_enough_for_both():
    """Same model, same d: both P are random maps with unit-norm columns per layer
    and near-orthogonal columns (|cos| ~ 1/√D_i, as for Gaussian columns), so a θ_d
    moves the weights by the same amount either way and the logits equally far."""
    d = 48
    dense = prepared("tiny-bert", "classification", d=d, projection="dense")
    ff = prepared("tiny-bert", "classification", d=d, projection="fastfood")
    assert (projection_kind(dense.model), projection_kind(ff.model)) == ("dense", "fastfood")
    dl = [m for m in dense.model.modules() if isinstance(m, IntrinsicLinear)]
    fl = [m for m in ff.model.modules() if isinstance(m, IntrinsicLinear)]
    for a, b in zip(dl[:6], fl[:6]):                  # one block: every layer shape
        Pa, Pb = a.id_projection.materialize(), b.id_projection.materialize()
        assert Pa.shape == Pb.shape
        rows = Pa.shape[0]
        for P in (Pa, Pb):
            norm, cos = column_stats(P)
            assert abs(norm - 1) < 0.05, norm
            assert cos < 2.0 / math.sqrt(rows), (cos, rows)
        assert (Pa - Pb).abs().max() > 1e-3           # different random maps, not one copied
    theta = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 0.05
    b = batch("tiny-bert")
    base = logits(base_model("tiny-bert", "classification"), b)
    moved = []
    for prep, layers in ((dense, dl), (ff, fl)):
        with torch.no_grad():
            layers[0].id_subspace.theta_d.copy_(theta)
        shift = sum(float(l.flat_delta().detach().norm() ** 2) for l in layers) ** 0.5
        # ‖P θ‖ ≈ √layers · ‖θ‖ (unit columns per layer)
        assert shift == pytest.approx(math.sqrt(len(layers)) * float(theta.norm()), rel=0.15)
        moved.append(float((logits(prep.model, b) - base).norm()))
    assert min(moved) > 0 and max(moved) / min(moved) < 3


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_training_in_the_subspace_lowers_the_loss_through_P_theta(projection):
    """The classification head is frozen, so θ_d is the only trainable tensor and the loss
    can fall only through the weights θ_0 + P θ_d. Training lowers it; θ_d back at zero
    gives the untrained model's logits exactly, so the whole change came through P θ_d. (The
    frozen random head reads the features at a small scale: a large learning rate for the 64
    numbers of θ_d makes the fall clear of noise.)"""
    cfg = parse_run_config({
        "name": "id-test", "model": "tiny-bert", "task": "classification",
        "dataset": {"name": "demo-sentiment", "max_rows": 200},
        "method": method_cfg(d=64, projection=projection),
        "training": {"max_steps": 20, "batch_size": 8, "learning_rate": 3e-1, "max_seq_len": 24,
                     "eval_every": 0, "eval_batches": 2}})
    prep = prepare_run(cfg)
    model = prep.model
    assert projection_kind(model) == projection
    for _, head in head_modules(model):
        head.requires_grad_(False)                      # the head stays as initialised
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("theta_d"), trainable
    theta = model.get_parameter(trainable[0])
    b = labelled_batch(prep, 32)
    untrained = logits(model, b)
    res = train(prep)
    first = sum(h["loss"] for h in res.history[:5]) / 5
    last = sum(h["loss"] for h in res.history[-5:]) / 5
    assert res.steps == 20 and last < first
    trained = logits(model, b)
    loss = lambda out: float(torch.nn.functional.cross_entropy(out, b["labels"]))   # noqa: E731
    assert loss(trained) < loss(untrained) - 1e-3, (loss(untrained), loss(trained))
    with torch.no_grad():
        theta.zero_()
    torch.testing.assert_close(logits(model, b), untrained, atol=1e-5, rtol=0)


def labelled_batch(prep: Prepared, n: int) -> dict:
    """The first `n` training rows of the run, tokenized, with their class ids."""
    rows = prep.examples.train[:n]
    enc = prep.tokenizer(rows["text"], return_tensors="pt", padding=True, truncation=True,
                         max_length=prep.config.training.max_seq_len)
    ids = {name: i for i, name in enumerate(prep.examples.labels)}
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([ids[y] for y in rows["label"]])}


# ---- save / load / merge ---------------------------------------------------------------------------

@pytest.mark.parametrize("projection,said", [("dense", True), ("fastfood", True), ("fastfood", False)])
def test_round_trip_regenerates_P_from_the_config(projection, said, tmp_path):
    prep = prepared("tiny-bert", "classification", d=40, projection=projection, said=said, projection_seed=7)
    with torch.no_grad():
        for p in prep.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    b = batch("tiny-bert")
    trained = logits(prep.model, b)
    save_adapter(prep, tmp_path)
    assert (tmp_path / "studio_adapter.safetensors").exists() and not (tmp_path / "adapter_config.json").exists()
    loaded = load_adapter(base_model("tiny-bert", "classification"), prep.config, tmp_path)
    torch.testing.assert_close(logits(loaded, b), trained, atol=1e-5, rtol=0)
    # another seed is another subspace: the same θ_d gives other outputs
    other = prep.config.model_copy(deep=True)
    other.method.projection_seed = 8
    wrong = load_adapter(base_model("tiny-bert", "classification"), other, tmp_path)
    assert not torch.allclose(logits(wrong, b), trained, atol=1e-3)


def test_merge_writes_theta0_plus_P_theta_into_the_weights():
    prep = prepared("tiny-bert", "classification", d=30, said=True)
    model = prep.model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    name = "bert.encoder.layer.3.intermediate.dense"
    layer = model.get_submodule(name)
    P = layer.id_projection.materialize()
    expected = torch.cat([layer.base_layer.weight.reshape(-1), layer.base_layer.bias]) \
        + layer.said_scale * (P @ layer.id_subspace.theta_d)
    b = batch("tiny-bert")
    before = logits(model, b)
    merge_and_unload(model)
    plain = model.get_submodule(name)
    assert type(plain).__name__ in ("Linear", "FastLinear")
    torch.testing.assert_close(torch.cat([plain.weight.reshape(-1), plain.bias]), expected.detach(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, b), before, atol=1e-5, rtol=0)
