"""engine.gemm: fp32 CPU linears on oneDNN match float64 references in values and
gradients and save what F.linear saves; the backend trial keeps oneDNN only for a
clear gain, measured on alternating in-place calls, and reports its picks; nothing
is probed at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from engine import gemm
from engine.gemm import _BackendTrial, gemm_mode, linear, matmul, matmul_t, onednn_enabled, picks, set_gemm_mode, \
    set_onednn_enabled
from engine.measure import SavedTensorRecorder

ROOT = Path(__file__).resolve().parent.parent
ONEDNN_OP = "mkldnn::_linear_pointwise"
# the pinned torch (2.13.0, CPU) has oneDNN: without it these tests fail rather than skip
needs_onednn = pytest.mark.usefixtures("onednn_required")


@pytest.fixture
def onednn_required():
    if not onednn_enabled():
        pytest.fail("this torch build has no oneDNN linear (the pinned torch 2.13.0 has one)")


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
    assert ONEDNN_OP in ops_run(lambda: linear(x, w, b))
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
    assert ONEDNN_OP not in ops_run(lambda: linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):                     # autocast keeps its own rules
        assert linear(x.float(), w.float()).dtype == torch.bfloat16
    was = onednn_enabled()
    set_onednn_enabled(False)
    try:
        xf, wf = x.detach().float(), w.detach().float()
        assert ONEDNN_OP not in ops_run(lambda: linear(xf, wf))
        assert torch.equal(linear(xf, wf), torch.nn.functional.linear(xf, wf))
    finally:
        set_onednn_enabled(was)


# --- the backend trial: oneDNN only where it is clearly faster ---------------------------------

def run_trial(onednn_s, blas_s) -> tuple[list[int], bool, _BackendTrial]:
    """Feed a trial timings from two lists (one per call, in call order per backend)
    until it decides; returns the backends it asked for, its decision, the trial."""
    trial, asked, decided, i = _BackendTrial(), [], None, [0, 0]
    while decided is None:
        b = trial.next_backend()
        asked.append(b)
        decided = trial.record(b, (onednn_s, blas_s)[b][i[b]])
        i[b] += 1
    return asked, decided, trial


def test_trial_alternates_skips_first_calls_and_keeps_blas_when_it_is_faster():
    n = _BackendTrial.SAMPLES
    # a slow first oneDNN call (primitive set-up) is not counted
    asked, decided, trial = run_trial([0.5] + [0.003] * n, [0.002] * (n + 1))
    assert asked == [0, 1] * (n + 1)
    assert decided is False and trial.ratio == pytest.approx(1.5)


def test_trial_keeps_onednn_only_beyond_the_margin():
    n = _BackendTrial.SAMPLES
    assert run_trial([0.001] * (n + 1), [0.004] * (n + 1))[1] is True
    assert run_trial([0.0090] * (n + 1), [0.010] * (n + 1))[1] is True          # 10% faster
    assert run_trial([0.0097] * (n + 1), [0.010] * (n + 1))[1] is False         # 3%: within noise, BLAS
    assert run_trial([0.010] * (n + 1), [0.010] * (n + 1))[1] is False          # a tie: BLAS


def test_trial_is_not_swayed_by_a_burst_of_load():
    """Two bursts of load on BLAS calls of a near tie would make a mean, or a
    single-sample decision, pick oneDNN; the median of paired ratios does not."""
    n = _BackendTrial.SAMPLES
    blas = [0.010] * (n + 1)
    blas[2] = blas[4] = 0.030
    assert run_trial([0.0099] * (n + 1), blas)[1] is False
    # the machine slowing down steadily while it is timed: adjacent pairs still compare like with like
    drift = [0.010 * 1.2 ** k for k in range(n + 1)]
    assert run_trial([t * 0.8 for t in drift], drift)[1] is True
    assert run_trial([t * 0.98 for t in drift], drift)[1] is False


def test_trial_decides_a_long_gemm_on_its_first_calls():
    trial = _BackendTrial()
    seen = []
    for seconds in (0.120, 0.100, 0.118, 0.101):          # oneDNN, BLAS, oneDNN, BLAS
        seen.append(trial.record(trial.next_backend(), seconds))
    assert seen[:-1] == [None] * (2 * _BackendTrial.LONG_SAMPLES - 1) and seen[-1] is False


@needs_onednn
def test_auto_mode_times_both_backends_in_place_then_sticks_to_one_and_reports_it():
    was = gemm_mode()
    set_gemm_mode("auto")
    try:
        g = torch.Generator().manual_seed(0)
        a, w = torch.randn(256, 128, generator=g), torch.randn(192, 128, generator=g)
        ref = a.double() @ w.double().t()
        name = "a@wT 256x128->192"
        for i in range(2 * (_BackendTrial.SAMPLES + 1)):
            assert name not in picks()
            torch.testing.assert_close(matmul_t(a, w).double(), ref, rtol=1e-5, atol=1e-4)
        pick = picks()[name]
        assert pick["backend"] in ("onednn", "blas") and pick["onednn_over_blas"] > 0
        assert (pick["backend"] == "onednn") == (pick["onednn_over_blas"] < 1 - _BackendTrial.MARGIN)
        ops = ops_run(lambda: matmul_t(a, w))
        assert (ONEDNN_OP in ops) == (pick["backend"] == "onednn")
        torch.testing.assert_close(matmul(a, w.t().contiguous()).double(), ref, rtol=1e-5, atol=1e-4)
        small = torch.randn(4, 8, generator=g)                # below TUNE_MIN_MACS: BLAS, untimed
        matmul_t(small, torch.randn(8, 8, generator=g))
        assert not any(k.startswith("a@wT 4x8") for k in picks())
        set_gemm_mode("auto")                                  # a new mode forgets the picks
        assert picks() == {}
    finally:
        set_gemm_mode(was)


def test_gemm_mode_rejects_unknown_values(monkeypatch):
    with pytest.raises(ValueError, match="GEMM mode 'fast'"):
        set_gemm_mode("fast")
    monkeypatch.setenv("STUDIO_ONEDNN_LINEAR", "maybe")
    with pytest.raises(ValueError, match="STUDIO_ONEDNN_LINEAR='maybe'"):
        gemm._mode_from_env()


IMPORT_PROBE = """
import json
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU]) as prof:
    import engine.prepare, engine.train
    from engine import gemm
ops = {e.key for e in prof.key_averages()}
probed_at_import = gemm._onednn_op is not gemm._NOT_PROBED
mode = gemm.gemm_mode()
print(json.dumps({"onednn_ops_at_import": sorted(k for k in ops if "mkldnn" in k),
                  "probed_at_import": probed_at_import, "mode": mode,
                  "probed_after_first_use": gemm._onednn_op is not gemm._NOT_PROBED}))
"""


def test_importing_the_engine_runs_no_gemm_and_the_first_use_probes_once():
    env = dict(os.environ, PYTHONPATH=str(ROOT), STUDIO_ONEDNN_LINEAR="auto")
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["onednn_ops_at_import"] == [] and out["probed_at_import"] is False
    assert out["probed_after_first_use"] is True
    assert out["mode"] == ("auto" if torch.backends.mkldnn.is_available() else "blas")
