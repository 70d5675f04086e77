"""The fp32 CPU GEMM backend: oneDNN's matmul primitive or the BLAS sgemm that
`F.linear` calls, chosen per GEMM shape by timing both on this machine.

Which is faster depends on the CPU: on an AMD EPYC (2 threads) oneDNN took
0.46-0.62x MKL's time for every SmolLM2 GEMM, while on a recent Xeon MKL was 5-10%
faster for most shapes, so neither is hard-wired. `STUDIO_ONEDNN_LINEAR` chooses:
`auto` (default) times both per shape in the first calls of a run and leaves
BLAS only for a clear gain (see `_BackendTrial`); `1` always oneDNN; `0` never.
Same fp32 arithmetic either way (no bf16/TF32 down-conversion; results differ
only by summation order, ~1e-6 relative). CUDA, bf16, autocast, float64 and
torch builds without oneDNN always take `F.linear`.

`picks()` reports what `auto` chose for each shape and the timings behind it,
so a run or a benchmark can say which backend its GEMMs ran on.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

MODES = ("auto", "onednn", "blas")
# GEMMs below this many multiply-adds take BLAS untimed: there the call overhead dominates
TUNE_MIN_MACS = 1 << 22


def _mode_from_env() -> str:
    """STUDIO_ONEDNN_LINEAR: `auto` (default: time both per GEMM shape), `1`/`on`
    (always oneDNN), `0`/`off` (always BLAS)."""
    raw = os.environ.get("STUDIO_ONEDNN_LINEAR", "auto").strip().lower()
    if raw in ("0", "false", "no", "off", "blas"):
        return "blas"
    if raw in ("1", "true", "yes", "on", "onednn"):
        return "onednn"
    if raw in ("", "auto"):
        return "auto"
    raise ValueError(f"STUDIO_ONEDNN_LINEAR={raw!r}: expected auto, 1 (always oneDNN) or 0 (never)")


_NOT_PROBED = object()
_onednn_op = _NOT_PROBED         # torch's oneDNN linear op, None where it is missing or wrong
_requested = _mode_from_env()    # what the environment or set_gemm_mode asked for
_mode: Optional[str] = None      # what applies: the request, or "blas" without oneDNN; set on first use
# (kind, rows rounded up to a power of two, inner, outer) -> True when oneDNN is kept,
# False when BLAS is, or the _BackendTrial still timing them
_FASTER_ON_ONEDNN: dict[tuple, object] = {}
_RATIOS: dict[tuple, float] = {}   # same keys, once decided: oneDNN's time over BLAS's


def _find_onednn_linear():
    """torch's oneDNN linear op (the one Inductor uses on CPU), checked on a tiny
    product; None when the build lacks it or it gives a wrong answer."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a = torch.ones(2, 3)
        if not torch.equal(op(a, torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


def gemm_mode() -> str:
    """`auto`, `onednn` or `blas`: the mode in force (the first call looks for oneDNN)."""
    global _mode, _onednn_op
    if _mode is None:
        if _onednn_op is _NOT_PROBED:
            _onednn_op = _find_onednn_linear()
        _mode = _requested if _onednn_op is not None else "blas"
    return _mode


def onednn_enabled() -> bool:
    """True when fp32 CPU GEMMs may run on oneDNN (mode `auto` or `onednn`)."""
    return gemm_mode() != "blas"


def set_gemm_mode(mode: str) -> None:
    """Choose the backend from now on (benchmarks, tests): `auto`, `onednn` or
    `blas`. Forgets earlier timings and picks."""
    global _requested, _mode
    if mode not in MODES:
        raise ValueError(f"GEMM mode {mode!r}: expected one of {', '.join(MODES)}")
    _requested, _mode = mode, None
    _FASTER_ON_ONEDNN.clear()
    _RATIOS.clear()


def set_onednn_enabled(enabled: bool) -> None:
    """Always oneDNN (True) or never (False)."""
    set_gemm_mode("onednn" if enabled else "blas")


def picks() -> dict[str, dict]:
    """What `auto` decided so far, per GEMM shape: {"a@wT 512x576->1536": {"backend":
    "onednn" or "blas", "onednn_over_blas": median time ratio}}. `a@wT` is a forward
    (or a product with a transposed weight), `a@w` an input gradient."""
    out = {}
    for key, choice in _FASTER_ON_ONEDNN.items():
        if isinstance(choice, bool):
            kind, rows, inner, outer = key
            out[f"{kind} {rows}x{inner}->{outer}"] = {"backend": "onednn" if choice else "blas",
                                                      "onednn_over_blas": round(_RATIOS[key], 3)}
    return out


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype is torch.float32 and weight.dtype is torch.float32
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and gemm_mode() != "blas"
            and not torch.compiler.is_compiling())      # compiled regions (engine.compile): Inductor's GEMMs


def _onednn_2d(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ w.T (+ bias) for a 2-D `a` on oneDNN."""
    return _onednn_op(a, w, bias, "none", [], "")


class _BackendTrial:
    """In-place timing of the two backends for one GEMM shape. The first calls of
    the shape alternate oneDNN, BLAS, oneDNN, ... as training runs, each timed where
    it really happens (cold weights, caches shared with the rest of the step: a GEMM
    timed alone in a loop flatters oneDNN, which repacks the weight on every call).
    Each backend's first call is not counted (oneDNN builds its primitive then).
    After `SAMPLES` counted calls each, the time ratio of each adjacent oneDNN/BLAS
    pair is taken, and oneDNN is kept only when the median ratio is below
    1 - `MARGIN`: a shape where the two are close stays on BLAS (what `F.linear`,
    and so peft, uses), so two processes do not pick differently by noise. A GEMM
    whose first BLAS call took over 20 ms (an LM head) runs once or twice a step,
    and a primitive's set-up is small beside it: it counts its first calls and
    needs `LONG_SAMPLES` each."""

    SAMPLES = 5
    LONG_SAMPLES = 2
    MARGIN = 0.05
    LONG_CALL_S = 0.02
    __slots__ = ("times", "ratio")

    def __init__(self):
        self.times: tuple[list[float], list[float]] = ([], [])
        self.ratio: Optional[float] = None

    def next_backend(self) -> int:
        """0 for oneDNN, 1 for BLAS: whichever has fewer timings so far."""
        return 0 if len(self.times[0]) <= len(self.times[1]) else 1

    def record(self, backend: int, seconds: float) -> Optional[bool]:
        """Store one timing; once both have enough, True when oneDNN is clearly faster."""
        self.times[backend].append(seconds)
        if self.times[1] and self.times[1][0] > self.LONG_CALL_S:
            counted, need = self.times, self.LONG_SAMPLES
        else:
            counted, need = [t[1:] for t in self.times], self.SAMPLES
        if min(len(c) for c in counted) < need:
            return None
        self.ratio = statistics.median(o / max(b, 1e-9) for o, b in zip(*counted))
        return self.ratio < 1.0 - self.MARGIN


def _tuned(kind: str, a: torch.Tensor, n_out: int, onednn, blas) -> torch.Tensor:
    """Run the GEMM on the backend chosen for this shape. Rows are bucketed to
    powers of two, so variable-length batches share a decision."""
    mode = gemm_mode()
    if mode == "onednn":
        return onednn()
    rows, inner = a.shape
    if mode == "blas" or rows * inner * n_out < TUNE_MIN_MACS:
        return blas()
    key = (kind, 1 << max(rows - 1, 0).bit_length(), inner, n_out)
    choice = _FASTER_ON_ONEDNN.get(key)
    if isinstance(choice, bool):
        return onednn() if choice else blas()
    trial = choice if choice is not None else _FASTER_ON_ONEDNN.setdefault(key, _BackendTrial())
    backend = trial.next_backend()
    t0 = time.perf_counter()
    out = (onednn, blas)[backend]()
    decided = trial.record(backend, time.perf_counter() - t0)
    if decided is not None:
        _FASTER_ON_ONEDNN[key] = decided
        _RATIOS[key] = trial.ratio
    return out


def _linear_2d(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ w.T (+ bias), 2-D, no autograd, on the chosen backend."""
    return _tuned("a@wT", a, w.shape[0], lambda: _onednn_2d(a, w, bias), lambda: F.linear(a, w, bias))


def matmul_t(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T for 2-D tensors, without autograd (on the chosen backend where oneDNN applies)."""
    return _linear_2d(a, w) if _takes_onednn(a, w) else a @ w.t()


def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w for 2-D tensors, without autograd (on the chosen backend where oneDNN applies)."""
    if not _takes_onednn(a, w):
        return a @ w
    return _tuned("a@w", a, w.shape[1], lambda: _onednn_2d(a, w.t()), lambda: a @ w)


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b with the forward and input-gradient GEMMs on the chosen backend.
    Saves W for the input gradient, and x only when W trains (what autograd saves for
    F.linear). The weight gradient stays on BLAS: it measured no faster on oneDNN."""

    @staticmethod
    def forward(ctx, x2, weight, bias):
        # 2-D in and out: a view made here could not be added to in place afterwards
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        return _linear_2d(x2, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = matmul(grad, weight) if need_x else None
        dw = grad.t() @ x2 if need_w else None
        db = grad.sum(0) if need_b else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear; fp32 CPU tensors on the chosen one of oneDNN and BLAS."""
    if not _takes_onednn(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _LinearFn.apply(x2, weight, bias)
    else:
        y = _linear_2d(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
