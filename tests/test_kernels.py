"""engine.kernels: the fused SwiGLU gives the same values and gradients as the
model's own MLP, saves a third less for backward, and keeps parameter names."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.kernels import SwiGLUMLP, _SwiGLUProduct, fuse_swiglu_mlps, swiglu
from engine.measure import SavedTensorRecorder
from engine.models import load_model


def test_swiglu_product_gradients_match_autograd_in_double():
    g = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUProduct.apply, (g, u))
    # only one input needing a gradient: the other gets none, and the values still match
    for needs in ((True, False), (False, True)):
        a = torch.randn(4, 6, dtype=torch.float64, requires_grad=needs[0])
        b = torch.randn(4, 6, dtype=torch.float64, requires_grad=needs[1])
        out = swiglu(a, b)
        ref = torch.nn.functional.silu(a.detach()) * b.detach()
        torch.testing.assert_close(out.detach(), ref)
        out.sum().backward()
        assert (a.grad is not None) == needs[0] and (b.grad is not None) == needs[1]


def test_fused_mlp_keeps_names_values_and_gradients_and_saves_less():
    model = load_model("tiny-llama", "causal_lm").model.float()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    assert fuse_swiglu_mlps(model) == model.config.num_hidden_layers
    assert fuse_swiglu_mlps(model) == 0                        # idempotent
    assert [n for n, _ in model.named_parameters()] == names     # adapters and exports see the same names
    assert all(isinstance(layer.mlp, SwiGLUMLP) for layer in model.model.layers)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (model, ref):
        for p in m.parameters():
            p.requires_grad_(True)
    with SavedTensorRecorder(list(model.parameters())) as fused_rec:
        fused = model(input_ids=ids).logits
    with SavedTensorRecorder(list(ref.parameters())) as ref_rec:
        plain = ref(input_ids=ids).logits
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    fused.float().pow(2).mean().backward()
    plain.float().pow(2).mean().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    # one FFN-wide tensor (silu(gate)) per layer fewer
    cfg = model.config
    one = 2 * 16 * cfg.intermediate_size * 4
    assert ref_rec.total_bytes - fused_rec.total_bytes == pytest.approx(cfg.num_hidden_layers * one, rel=0.01)


def test_bert_has_no_swiglu_to_fuse():
    model = load_model("tiny-bert", "classification").model
    assert fuse_swiglu_mlps(model) == 0


# --- FastLinear: fp32 CPU matmuls on oneDNN -------------------------------------------

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from engine import kernels  # noqa: E402
from engine.kernels import (FastLinear, _BackendTrial, gemm_mode, linear, matmul, matmul_t, onednn_enabled,  # noqa: E402
                            set_gemm_mode, set_onednn_enabled, use_fast_linears)

needs_onednn = pytest.mark.skipif(not onednn_enabled(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def always_onednn():
    was = gemm_mode()
    set_gemm_mode("onednn")
    yield
    set_gemm_mode(was)


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_trains", [True, False])
def test_linear_matches_float64_reference_in_values_and_gradients(shape, bias, weight_trains, always_onednn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(16, 24, generator=g, requires_grad=weight_trains)
    b = torch.randn(16, generator=g, requires_grad=weight_trains) if bias else None
    out = linear(x, w, b)
    assert "mkldnn::_linear_pointwise" in ops_run(lambda: linear(x, w, b))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(weight_trains)
    b64 = b.detach().double().requires_grad_(weight_trains) if bias else None
    ref = torch.nn.functional.linear(x64, w64, b64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(upstream.float())
    ref.backward(upstream)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    if weight_trains:
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
        if bias:
            torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    else:
        assert w.grad is None


@needs_onednn
def test_linear_saves_what_autograd_saves_for_f_linear(always_onednn):
    """A frozen weight: nothing but the weight itself (the input is not kept)."""
    x = torch.randn(4, 8, 32, requires_grad=True)
    for trains in (False, True):
        w = torch.randn(64, 32, requires_grad=trains)
        with SavedTensorRecorder([w]) as ours:
            linear(x, w)
        with SavedTensorRecorder([w]) as theirs:
            torch.nn.functional.linear(x, w)
        assert ours.total_bytes == theirs.total_bytes
        assert (ours.total_bytes > 0) == trains


def test_linear_falls_back_to_f_linear_where_onednn_does_not_apply():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, w))                       # float64: F.linear, exact
    assert "mkldnn::_linear_pointwise" not in ops_run(lambda: linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):                     # autocast keeps its own rules
        assert linear(x.float(), w.float()).dtype == torch.bfloat16
    was = onednn_enabled()
    set_onednn_enabled(False)
    try:
        xf, wf = x.detach().float(), w.detach().float()
        assert "mkldnn::_linear_pointwise" not in ops_run(lambda: linear(xf, wf))
        assert torch.equal(linear(xf, wf), torch.nn.functional.linear(xf, wf))
    finally:
        set_onednn_enabled(was)


def test_fast_linears_keep_names_state_and_logits():
    model = load_model("tiny-llama", "causal_lm").model.float()
    ref = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = use_fast_linears(model)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in ref.modules()) and n > 0
    assert use_fast_linears(model) == 0
    assert all(isinstance(m, FastLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.state_dict().keys() == state.keys()
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# --- the backend trial: each GEMM shape on whichever backend ran it faster ---------------------

def test_backend_trial_alternates_skips_first_calls_and_keeps_the_faster():
    trial = _BackendTrial()
    picks = []
    for _ in range(2 * (trial.SAMPLES + 1)):
        backend = trial.next_backend()
        picks.append(backend)
        # oneDNN 3 ms, BLAS 2 ms, except a slow first oneDNN call (primitive set-up)
        seconds = (0.5 if len(trial.times[0]) == 0 else 0.003) if backend == 0 else 0.002
        decided = trial.record(backend, seconds)
    assert picks == [0, 1] * (trial.SAMPLES + 1)
    assert decided is False                                    # BLAS was faster
    slow_blas = _BackendTrial()
    for _ in range(2 * (slow_blas.SAMPLES + 1)):
        b = slow_blas.next_backend()
        decided = slow_blas.record(b, 0.001 if b == 0 else 0.004)
    assert decided is True


def test_backend_trial_decides_a_long_gemm_on_one_call_each():
    trial = _BackendTrial()
    assert trial.record(trial.next_backend(), 0.120) is None   # oneDNN
    assert trial.record(trial.next_backend(), 0.100) is False  # BLAS, decided at once


@needs_onednn
def test_auto_mode_times_both_backends_in_place_then_sticks_to_one():
    was = gemm_mode()
    set_gemm_mode("auto")
    try:
        g = torch.Generator().manual_seed(0)
        a, w = torch.randn(256, 128, generator=g), torch.randn(192, 128, generator=g)
        ref = a.double() @ w.double().t()
        key = ("a@wT", 256, 128, 192)
        for i in range(2 * (_BackendTrial.SAMPLES + 1)):
            assert not isinstance(kernels._FASTER_ON_ONEDNN.get(key), bool)
            torch.testing.assert_close(matmul_t(a, w).double(), ref, rtol=1e-5, atol=1e-4)
        choice = kernels._FASTER_ON_ONEDNN[key]
        assert isinstance(choice, bool)
        ops = ops_run(lambda: matmul_t(a, w))
        assert ("mkldnn::_linear_pointwise" in ops) == choice
        torch.testing.assert_close(matmul(a, w.t().contiguous()).double(), ref, rtol=1e-5, atol=1e-4)
        small = torch.randn(4, 8, generator=g)                # below TUNE_MIN_MACS: BLAS, untimed
        matmul_t(small, torch.randn(8, 8, generator=g))
        assert ("a@wT", 4, 8, 8) not in kernels._FASTER_ON_ONEDNN
    finally:
        set_gemm_mode(was)


def test_gemm_mode_rejects_unknown_values(monkeypatch):
    with pytest.raises(ValueError, match="GEMM mode 'fast'"):
        set_gemm_mode("fast")
    monkeypatch.setenv("STUDIO_ONEDNN_LINEAR", "maybe")
    with pytest.raises(ValueError, match="STUDIO_ONEDNN_LINEAR='maybe'"):
        kernels._mode_from_env()
