"""Triton kernels for the elementwise parts of a CUDA training step.

The CUDA counterpart of engine.fused (the fp32 CPU C kernels): RMSNorm, rotary
position embedding, the SwiGLU product, softmax cross-entropy of a chunk of logits
in place, and NF4 dequantization, each one kernel forward and one backward, for
bf16, fp16 and fp32 tensors with fp32 arithmetic inside. They keep for backward
exactly what the C kernels keep (RMSNorm: its input and one fp32 rstd per row;
SwiGLU: gate and up; RoPE: cos and sin only), so the memory estimator's accounting
is the same on both devices. The first GPU run of the project found a small
model's step bound by kernel launches (issue 25): torch runs each of these parts
as five to ten launches (plus dtype casts), here each is one.

When they are used (`applies`): triton imports, the switch `STUDIO_TRITON_KERNELS`
is not 0, and the tensors are CUDA tensors of a float dtype. The switch:

- `1` (default): CUDA tensors take the Triton kernels;
- `0`: never (torch ops on CUDA; the C kernels on fp32 CPU are unaffected);
- `interpret`: CPU tensors take them too, run by Triton's interpreter (the
  kernels are built with TRITON_INTERPRET=1): slow, for tests of the dispatch on
  machines without a GPU. CUDA tensors still take them (interpreted as well).

Nothing here imports triton until a tensor could take a kernel, so CPU processes
pay nothing. A failed import of triton (or of a kernel) warns once and leaves the
torch ops (or the C kernels) in place.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("0", "1", "interpret")
_PLAIN = (torch.Tensor, torch.nn.Parameter)

_lock = threading.Lock()
_ops: Optional[ModuleType] = None          # engine.kernels.api, once loaded
_interpreted: Optional[bool] = None        # whether the loaded kernels run in Triton's interpreter
_unavailable: Optional[str] = None         # why they cannot be used, once known


def _mode_from_env() -> str:
    raw = os.environ.get("STUDIO_TRITON_KERNELS", "1").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return "0"
    if raw in ("1", "true", "yes", "on", ""):
        return "1"
    if raw == "interpret":
        return "interpret"
    raise ValueError(f"STUDIO_TRITON_KERNELS={raw!r}: expected 1 (Triton kernels for CUDA tensors), 0 (torch ops) "
                     f"or interpret (also CPU tensors, through Triton's interpreter)")


_mode = _mode_from_env()


def mode() -> str:
    """The switch in force: '0', '1' or 'interpret'."""
    return _mode


def set_mode(new: str) -> str:
    """Switch to `new` ('0', '1' or 'interpret') from now on and return the previous
    mode (tests, benchmarks). The kernels are built once per process, interpreted
    or compiled: switching to 'interpret' after they were built compiled raises."""
    global _mode
    if new not in MODES:
        raise ValueError(f"kernels.set_mode: {new!r} is not one of {MODES}")
    if new == "interpret" and _interpreted is False:
        raise RuntimeError("kernels.set_mode('interpret'): the Triton kernels were already built for the GPU "
                           "in this process; set STUDIO_TRITON_KERNELS=interpret before it starts")
    old, _mode = _mode, new
    return old


def _interpret_env(on: bool) -> None:
    """TRITON_INTERPRET=1 from now on in this process when the kernels are to be
    interpreted: triton.jit decides when a function is defined (triton's own library
    functions when triton is imported) whether it is compiled or interpreted, and the
    interpreter reads the variable again at launch."""
    if on:
        os.environ["TRITON_INTERPRET"] = "1"


_interpret_env(_mode == "interpret")      # as early as possible: before anything imports triton


def _interpreter_ready() -> Optional[str]:
    """Why triton's interpreter cannot run the kernels in this process, or None."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tl.sigmoid, InterpretedFunction):
        return ("triton was imported before TRITON_INTERPRET=1 was set; set STUDIO_TRITON_KERNELS=interpret "
                "(or TRITON_INTERPRET=1) in the environment the process starts with")
    return None


def _load() -> Optional[ModuleType]:
    """The kernels' entry points (engine.kernels.api), importing triton on first use;
    None (with one warning) when they cannot be had."""
    global _ops, _interpreted, _unavailable
    if _ops is not None or _unavailable is not None:
        return _ops
    with _lock:
        if _ops is None and _unavailable is None:
            interpret = _mode == "interpret"
            try:
                _interpret_env(interpret)
                reason = _interpreter_ready() if interpret else None
                if reason is None:
                    _ops = importlib.import_module(f"{__name__}.api")
                    _interpreted = os.environ.get("TRITON_INTERPRET") == "1"
                else:
                    _unavailable = reason
            except (ImportError, RuntimeError, OSError) as exc:
                _unavailable = f"{type(exc).__name__}: {exc}"
            if _unavailable is not None:
                warnings.warn(f"engine.kernels: Triton kernels unavailable ({_unavailable}); using torch ops",
                              RuntimeWarning, stacklevel=3)
    return _ops


def unavailable_reason() -> Optional[str]:
    return _unavailable


def interpreted() -> Optional[bool]:
    """Whether the loaded kernels run in Triton's interpreter (None: not loaded yet)."""
    return _interpreted


def applies(*tensors: torch.Tensor) -> bool:
    """True when these tensors go to the Triton kernels: all on one CUDA device (or
    CPU in 'interpret' mode), of a float dtype (bf16, fp16, fp32; they may differ),
    plain tensors or parameters (not DTensors or other subclasses, whose storage a
    kernel cannot address), not empty, the switch on, triton importable, and not
    inside a region torch.compile traces (there torch's ops stay: its compiler
    fuses them itself). Shapes are the kernels' to check."""
    if _mode == "0":
        return False
    first = tensors[0]
    kind = first.device.type
    if not (kind == "cuda" or (kind == "cpu" and _mode == "interpret")) or torch.compiler.is_compiling():
        return False
    return (first.numel() > 0 and all(type(t) in _PLAIN and t.device == first.device and t.dtype in FLOAT_DTYPES
                                      for t in tensors)
            and _load() is not None)


def launch_counts() -> dict[str, int]:
    """Launches of each Triton kernel (by kernel name) since the process started;
    empty while the kernels were never loaded."""
    if _ops is None:
        return {}
    from ._launch import LAUNCHES
    return dict(LAUNCHES)


def ops() -> ModuleType:
    """engine.kernels.api (rms_norm, rope, swiglu, softmax_xent_, nf4_dequantize);
    check `applies` first."""
    loaded = _load()
    if loaded is None:
        raise RuntimeError(f"engine.kernels: Triton kernels unavailable ({_unavailable})")
    return loaded
