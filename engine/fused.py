"""Fused elementwise kernels for fp32 CPU training, written in C (engine/csrc/fused.c).

The elementwise parts of a transformer step are memory-bound: their time is the
number of full passes over memory, and torch runs one pass per op. Llama's RMSNorm
(Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467)
as transformers writes it is six ops forward and about ten backward; SwiGLU's
silu(gate) * up (Shazeer 2020, arXiv:2002.05202) is two forward and four backward.
Here each is one loop forward and one backward, with the same saved tensors.

The C file is built with the machine's C compiler the first time a process needs it
(about a second; `-O3 -march=native`, cached under STUDIO_KERNEL_CACHE, default
~/.cache/peft-studio/kernels, keyed by source, flags, compiler and CPU) and loaded
with ctypes. No compiler or a failed build (a warning says why, once),
`STUDIO_FUSED_KERNELS=0`, non-fp32 or non-CPU tensors: torch ops instead (`swiglu`
chooses by itself; the other kernels' callers check `applies` first).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .rope_op import check_rope_args, rope_function

SOURCE = Path(__file__).with_name("csrc") / "fused.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
# 512-bit vectors where the CPU has them (gcc prefers 256 by default): the SiLU
# polynomial is compute-bound enough to gain from them
X86_CFLAGS = ("-mprefer-vector-width=512",)

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_unavailable: Optional[str] = None     # why the kernels are not used, once known


def _enabled_by_env() -> bool:
    raw = os.environ.get("STUDIO_FUSED_KERNELS", "1").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on", ""):
        return True
    raise ValueError(f"STUDIO_FUSED_KERNELS={raw!r}: expected 1 (use the fused C kernels) or 0 (torch ops)")


_enabled = _enabled_by_env()


def set_enabled(enabled: bool) -> None:
    """Use the fused kernels (True) or torch ops (False) from now on (benchmarks, tests)."""
    global _enabled
    _enabled = bool(enabled)


def cache_dir() -> Path:
    if os.environ.get("STUDIO_KERNEL_CACHE"):
        return Path(os.environ["STUDIO_KERNEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peft-studio" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cflags() -> tuple[str, ...]:
    return CFLAGS + (X86_CFLAGS if platform.machine() in ("x86_64", "AMD64") else ())


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    return cc


def _build(cc: str, source: Path = SOURCE) -> Path:
    """Compile a csrc/*.c into the cache (atomically: a half-written library is never
    loaded) unless a build for this source, compiler and CPU is there already."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(_cflags()), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_cflags(), str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_c(source: Path) -> ctypes.CDLL:
    """Build `source` (a C file of engine/csrc) with the machine's compiler into the
    kernel cache, if not there yet, and load it. Raises RuntimeError (no compiler, a
    failed build), OSError or subprocess.SubprocessError when it cannot."""
    return ctypes.CDLL(str(_build(_compiler(), source)))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.rms_norm_forward.argtypes = [p, p, p, p, i64, i64, f32, i32]
    lib.rms_norm_backward.argtypes = [p, p, p, p, p, i64, i64, i32]
    lib.swiglu_forward.argtypes = [p, p, p, i64, i32]
    lib.swiglu_backward.argtypes = [p, p, p, p, p, i64, i32]
    lib.rope_apply.argtypes = [p, p, p, p, i64, i64, i64, i64, i32, i32]
    lib.softmax_xent.argtypes = [p, p, p, i64, i64, f32, i32, i32]
    lib.nf4_dequantize.argtypes = [p, p, p, p, i64, i64, i32]
    for fn in (lib.rms_norm_forward, lib.rms_norm_backward, lib.swiglu_forward, lib.swiglu_backward,
               lib.rope_apply, lib.softmax_xent, lib.nf4_dequantize):
        fn.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, building them on first use; None when they cannot be had."""
    global _lib, _unavailable
    if _lib is not None or _unavailable is not None:
        return _lib
    with _lock:
        if _lib is None and _unavailable is None:
            try:
                _lib = _declare(load_c(SOURCE))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _unavailable = str(exc)
                warnings.warn(f"engine.fused: fused CPU kernels unavailable ({_unavailable}); using torch ops",
                              RuntimeWarning, stacklevel=3)
    return _lib


def unavailable_reason() -> Optional[str]:
    return _unavailable


def applies(*tensors: torch.Tensor) -> bool:
    """True when these tensors go to the fused kernels: fp32, CPU, same shape,
    not empty, no autocast, and the library could be built."""
    first = tensors[0]
    return (_enabled and first.device.type == "cpu" and first.numel() > 0
            and all(t.dtype is torch.float32 and t.device.type == "cpu" and t.shape == first.shape for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and library() is not None)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


# ---- RMSNorm ---------------------------------------------------------------------------------

class _RMSNorm(torch.autograd.Function):
    """Saves x (the input itself, no copy) and one fp32 rstd per row: what torch's
    ops save for a frozen weight, minus nothing; the weight gradient, when asked
    for, is a plain torch reduction."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        w = weight.contiguous()
        rows, cols = x.numel() // x.shape[-1], x.shape[-1]
        y = torch.empty_like(x)
        rstd = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32)
        library().rms_norm_forward(_ptr(x), _ptr(w), _ptr(y), _ptr(rstd), rows, cols, float(eps),
                                   torch.get_num_threads())
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            library().rms_norm_backward(_ptr(grad), _ptr(x), _ptr(w), _ptr(rstd), _ptr(dx),
                                        x.numel() // x.shape[-1], x.shape[-1], torch.get_num_threads())
        if ctx.needs_input_grad[1]:
            dw = (grad * x * rstd).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension (fp32 CPU tensors;
    check `applies(x)` first)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for inputs of width {x.shape[-1]}")
    return _RMSNorm.apply(x, weight, eps)       # without a graph, apply keeps nothing


# ---- SwiGLU product --------------------------------------------------------------------------

class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up in one C loop each way, saving gate and up only (silu is
    recomputed in backward), and `up` only when gate needs a gradient."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        library().swiglu_forward(_ptr(gate), _ptr(up), _ptr(h), gate.numel(), torch.get_num_threads())
        need_gate, need_up = ctx.needs_input_grad
        ctx.save_for_backward(gate if (need_gate or need_up) else None, up if need_gate else None)
        return h

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        grad = grad.contiguous()
        dg = torch.empty_like(gate) if need_gate else None
        du = torch.empty_like(gate) if need_up else None
        library().swiglu_backward(_ptr(grad), _ptr(gate), _ptr(up), _ptr(dg), _ptr(du), gate.numel(),
                                  torch.get_num_threads())
        return dg, du


class _SwiGLUTorch(torch.autograd.Function):
    """The same product and saved tensors in torch ops, for tensors the C loop does
    not take (CUDA, bf16, float64, kernels off)."""

    @staticmethod
    def forward(ctx, gate, up):
        need_gate, need_up = ctx.needs_input_grad
        ctx.save_for_backward(gate if (need_gate or need_up) else None, up if need_gate else None)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
        d_up = grad * F.silu(gate) if need_up else None
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for tensors of one shape: the C loop where `applies(gate, up)`,
    else torch ops; under autograd either keeps only gate and up for backward
    (autograd's default also keeps silu(gate), a third tensor of the FFN's width)."""
    if applies(gate, up):
        return _SwiGLU.apply(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad) and not torch.compiler.is_compiling():
        return _SwiGLUTorch.apply(gate, up)     # (compiled regions: Inductor fuses and chooses what to save)
    return F.silu(gate) * up


# ---- rotary position embedding ---------------------------------------------------------------

def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    tokens, heads, dim = x.shape[0] * x.shape[1], x.shape[2], x.shape[3]
    library().rope_apply(_ptr(x), _ptr(cos), _ptr(sin), _ptr(out), tokens, heads, dim, cos.numel() // dim,
                         int(transpose), torch.get_num_threads())
    return out


_RoPE = rope_function(_rope, "_RoPE")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, "RoFormer", arXiv:2104.09864) in
    transformers' half-split layout. x: [batch, seq, heads, head_dim], fp32 CPU;
    cos, sin: [batch or 1, seq, head_dim] (no gradient). Returns a new contiguous
    [batch, seq, heads, head_dim] tensor."""
    check_rope_args(x, cos, sin)
    # one cos/sin for the whole batch stays one tensor (no per-layer copies to save)
    return _RoPE.apply(x.contiguous(), cos.contiguous(), sin.contiguous())


# ---- softmax cross-entropy -------------------------------------------------------------------

def softmax_xent_(logits: torch.Tensor, target: torch.Tensor, scale: float, grad: bool) -> torch.Tensor:
    """Per-row cross-entropy logsumexp(logits) - logits[target] of a contiguous fp32
    CPU [rows, vocab] tensor; with `grad`, `logits` is overwritten by
    (softmax - onehot(target)) * scale, the gradient of scale * sum(loss). Targets
    must lie in [0, vocab)."""
    if logits.dim() != 2 or not logits.is_contiguous() or target.shape != logits.shape[:1]:
        raise ValueError(f"softmax_xent_: logits {tuple(logits.shape)} and targets {tuple(target.shape)}")
    target = target.to(torch.int64).contiguous()
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise ValueError(f"softmax_xent_: a target lies outside [0, {logits.shape[1]})")
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    library().softmax_xent(_ptr(logits), _ptr(target), _ptr(loss), logits.shape[0], logits.shape[1], float(scale),
                           int(grad), torch.get_num_threads())
    return loss


# ---- NF4 dequantization ----------------------------------------------------------------------

def nf4_dequantize(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, numel: int,
                   block: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first `numel` weights of an NF4 tensor as fp32: packed uint8 codes (two per
    byte, high nibble first), the 16 code values, one fp32 absmax per `block` weights;
    written into `out` (fp32, contiguous, `numel` elements) when given. CPU tensors;
    check `applies(absmax)` first."""
    if packed.dtype != torch.uint8 or code.numel() != 16 or packed.numel() * 2 < numel \
            or absmax.numel() * block < numel or block % 2:
        raise ValueError(f"nf4_dequantize: {packed.numel()} packed bytes, {absmax.numel()} blocks of {block} "
                         f"for {numel} weights")
    if out is None:
        out = torch.empty(numel, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: out must be a contiguous fp32 tensor of {numel} elements")
    library().nf4_dequantize(_ptr(packed.contiguous()), _ptr(code.float().contiguous()),
                             _ptr(absmax.float().contiguous()), _ptr(out), numel, block, torch.get_num_threads())
    return out
