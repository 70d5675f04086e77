"""AdamW with block-wise 8-bit states, and its paged variant.

Dettmers, Lewis, Shleifer & Zettlemoyer 2022, "8-bit Optimizers via Block-wise
Quantization", arXiv:2110.02861; the paged variant as used by QLoRA (Dettmers et
al. 2023, arXiv:2305.14314).

Each moment of a parameter is cut into blocks of 2048 values. A block keeps its
absolute maximum (fp32) and one byte per value: the value divided by the absmax,
rounded to the nearest entry of a dynamic tree code (Dettmers 2016, arXiv:1511.04561):

    [sign] 0 ... 0 1 f ... f      e leading zeros, an indicator bit, the rest fraction

A code with e leading zeros and f fraction bits k stands for 10^-e * (0.1 + 0.9 (k+1) / 2^f):
each decade [10^-(e+1), 10^-e] is split linearly, finer for large values. The first
moment uses the signed code (7 bits after the sign, e = 0..6), the second moment the
unsigned one (the sign bit becomes one more bit of range, e = 0..7); all zeros is 0.
The step dequantizes a block, runs the fp32 AdamW update (decoupled weight decay,
bias correction, as torch.optim.AdamW) and quantizes the new moments (round to nearest,
no stochastic rounding). Parameters with fewer than 1024 values (biases, norms, gates)
keep fp32 moments. bitsandbytes draws that line at 4096 values; ours is lower so that
small LoRA matrices (SmolLM2's 192 x 8 v_proj B) are quantized too.

`paged_adamw_8bit` keeps the states in host memory (pinned on CUDA) and copies one
parameter's states onto the device for its update and back, so the device never
holds more than one parameter group's states (on CPU the same copies run, host to host).

State dicts hold plain tensors (uint8 codes, fp32 absmax, fp32 moments of small
parameters) and ints, so a checkpoint resumes the exact same trajectory.

On CPU with fp32 parameters the step is one C loop per block (engine/csrc/adam8bit.c,
built and cached like engine.fused's kernels; STUDIO_FUSED_KERNELS=0 turns it off);
elsewhere it is torch ops over chunks of blocks.
"""

from __future__ import annotations

import ctypes
import math
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch

from . import fused

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
BLOCK = 2048
MIN_8BIT_NUMEL = 1024
CHUNK_BLOCKS = 256                 # blocks dequantized at once (bounds the fp32 temporaries)
SIGNED_MAX_E, UNSIGNED_MAX_E = 6, 7


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values of the dynamic tree code, indexed by the code byte (float64)."""
    bits = 7 if signed else 8
    values = torch.zeros(256, dtype=torch.float64)
    for code in range(256):
        mag = code & 0x7F if signed else code
        if mag == 0:
            continue
        f = mag.bit_length() - 1                    # fraction bits after the indicator
        e = bits - 1 - f                            # leading zeros
        k = mag - (1 << f)
        v = 10.0 ** (-e) * (0.1 + 0.9 * (k + 1) / (1 << f))
        values[code] = -v if (signed and code & 0x80) else v
    return values


SIGNED_MAP = dynamic_map(True).float()
UNSIGNED_MAP = dynamic_map(False).float()


def quantize_codes(y: torch.Tensor, signed: bool) -> torch.Tensor:
    """Nearest dynamic-code byte of each y in [-1, 1] (unsigned: [0, 1]), computed
    from the code's structure: the decade from log10, then the linear step in it."""
    bits = 7 if signed else 8
    emax = SIGNED_MAX_E if signed else UNSIGNED_MAX_E
    a = y.abs().clamp_(max=1.0)
    e = torch.floor(-torch.log10(a)).clamp_(0, emax)          # a = 0 gives +inf -> emax
    scaled = a * torch.pow(10.0, e)                           # in [0.1, 1] within the decade
    steps = torch.pow(2.0, (bits - 1) - e)                    # 2^f
    # grid of the decade, k' = 0 .. 2^f: k' = 0 is the top of the next decade (code 2^f - 1)
    kp = torch.minimum(torch.round((scaled - 0.1) / 0.9 * steps).clamp_(min=0), steps)
    last = torch.round(scaled).clamp_(0, 1)                   # last decade: {0, 10^-emax}
    kp = torch.where(e == emax, last, kp)
    mag = (steps + kp - 1).clamp_(min=0).to(torch.uint8)
    if signed:
        mag = torch.where(y < 0, mag | 0x80, mag)
    return mag


def _bucket_starts(qmap: torch.Tensor, n: int) -> torch.Tensor:
    """For each non-negative float's top 16 bits (its bucket), the largest of the first
    `n` codes (non-negative, increasing values) whose value is at most the bucket's start."""
    starts = (torch.arange(32768, dtype=torch.int32) << 16).view(torch.float32)
    idx = torch.searchsorted(qmap[:n].contiguous(), starts, right=True) - 1
    return idx.clamp(0, n - 1).to(torch.uint8).contiguous()


SIGNED_START, UNSIGNED_START = _bucket_starts(SIGNED_MAP, 128), _bucket_starts(UNSIGNED_MAP, 256)
KERNEL_SOURCE = Path(__file__).with_name("csrc") / "adam8bit.c"
_kernel_lock = threading.Lock()
_kernel_lib: Optional[ctypes.CDLL] = None
_kernel_missing: Optional[str] = None


def kernel() -> Optional[ctypes.CDLL]:
    """The C step, built on first use (cached by source, flags, compiler and CPU); None
    when off (STUDIO_FUSED_KERNELS=0 / engine.fused.set_enabled(False)) or unbuildable."""
    global _kernel_lib, _kernel_missing
    if not fused._enabled:
        return None
    if _kernel_lib is not None or _kernel_missing is not None:
        return _kernel_lib
    with _kernel_lock:
        if _kernel_lib is None and _kernel_missing is None:
            try:
                _kernel_lib = _load_kernel()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _kernel_missing = str(exc)
                warnings.warn(f"engine.optim: 8-bit AdamW C kernel unavailable ({exc}); using torch ops",
                              RuntimeWarning, stacklevel=3)
    return _kernel_lib


def _load_kernel() -> ctypes.CDLL:
    lib = fused.load_c(KERNEL_SOURCE)
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.adam8bit_step.argtypes = [p, p, p, p, p, p, i64, i64, p, p, p, p,
                                  f32, f32, f32, f32, f32, f32, f32, ctypes.c_int]
    lib.adam8bit_step.restype = None
    return lib


def _blocks_of(flat: torch.Tensor, n_blocks: int) -> torch.Tensor:
    pad = n_blocks * BLOCK - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(n_blocks, BLOCK)


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of x.numel(), fp32 absmax per block of 2048)."""
    flat = x.reshape(-1).float()
    nb = -(-flat.numel() // BLOCK)
    blocks = _blocks_of(flat, nb)
    absmax = blocks.abs().amax(dim=1)
    codes = quantize_codes(blocks / absmax.clamp(min=1e-30)[:, None], signed)
    return codes.reshape(-1)[:flat.numel()].clone(), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of `codes` (flat) with their per-block absmax."""
    qmap = (SIGNED_MAP if signed else UNSIGNED_MAP).to(codes.device)
    nb = absmax.numel()
    vals = _blocks_of(qmap[codes.long()], nb)
    return (vals * absmax[:, None]).reshape(-1)[:codes.numel()]


def state_nbytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (its state)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) with block-wise 8-bit moments (see the module doc).
    `paged=True`: the states stay in (pinned) host memory between steps."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, paged: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW8bit: bad hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.paged = paged
        for g in self.param_groups:
            for p in g["params"]:
                if _is_dtensor(p):
                    raise ValueError("training.optimizer: the 8-bit optimizers need whole parameters; FSDP's "
                                     "sharded DTensor parameters are not supported (use adamw with fsdp, or ddp)")

    # ---- state ------------------------------------------------------------------------------
    def _home(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.paged else p.device

    def _new_state(self, p: torch.Tensor) -> dict:
        home, n = self._home(p), p.numel()
        pin = self.paged and p.device.type == "cuda"
        if n < MIN_8BIT_NUMEL:
            st = {"exp_avg": torch.zeros(n, dtype=torch.float32, device=home),
                  "exp_avg_sq": torch.zeros(n, dtype=torch.float32, device=home)}
        else:
            nb = -(-n // BLOCK)
            st = {"exp_avg_code": torch.zeros(n, dtype=torch.uint8, device=home),
                  "exp_avg_absmax": torch.zeros(nb, dtype=torch.float32, device=home),
                  "exp_avg_sq_code": torch.zeros(n, dtype=torch.uint8, device=home),
                  "exp_avg_sq_absmax": torch.zeros(nb, dtype=torch.float32, device=home)}
        if pin:
            st = {k: v.pin_memory() for k, v in st.items()}
        st["step"] = 0
        return st

    # ---- the update -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moved = False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                if p not in self.state or not self.state[p]:
                    self.state[p] = self._new_state(p)
                st = self.state[p]
                host = {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
                if self.paged:     # page in (on CPU a copy, so the same path runs), update, page out
                    work = {k: v.to(p.device, non_blocking=True, copy=True) for k, v in host.items()}
                    moved = moved or p.device.type == "cuda"
                else:
                    work = host
                st["step"] += 1
                self._update(p, work, st["step"], group)
                if work is not host:
                    for k, v in host.items():
                        v.copy_(work[k], non_blocking=True)
                del work
        if moved:
            torch.cuda.synchronize()
        return loss

    @staticmethod
    def _update(p: torch.Tensor, st: dict, step: int, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
        step_size, bc2_sqrt = lr / bc1, math.sqrt(bc2)
        flat = p.view(-1) if p.is_contiguous() else p.reshape(-1)
        grad = p.grad.reshape(-1)

        def apply(pc: torch.Tensor, gc: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
            g = gc.float()
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w = pc.float()
            if wd:
                w.mul_(1 - lr * wd)
            w.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
            pc.copy_(w)

        lib = None
        if "exp_avg" not in st and p.device.type == "cpu" and p.dtype is torch.float32 and p.is_contiguous():
            lib = kernel()
        if "exp_avg" in st:
            apply(flat, grad, st["exp_avg"], st["exp_avg_sq"])
        elif lib is not None:
            g = grad.float().contiguous()
            lib.adam8bit_step(flat.data_ptr(), g.data_ptr(), st["exp_avg_code"].data_ptr(),
                              st["exp_avg_absmax"].data_ptr(), st["exp_avg_sq_code"].data_ptr(),
                              st["exp_avg_sq_absmax"].data_ptr(), flat.numel(), BLOCK,
                              SIGNED_MAP.data_ptr(), SIGNED_START.data_ptr(),
                              UNSIGNED_MAP.data_ptr(), UNSIGNED_START.data_ptr(),
                              lr, b1, b2, eps, wd, step_size, bc2_sqrt, torch.get_num_threads())
        else:
            n, nb = flat.numel(), st["exp_avg_absmax"].numel()
            for b0 in range(0, nb, CHUNK_BLOCKS):
                b1_ = min(nb, b0 + CHUNK_BLOCKS)
                lo, hi = b0 * BLOCK, min(n, b1_ * BLOCK)
                m = dequantize_blockwise(st["exp_avg_code"][lo:hi], st["exp_avg_absmax"][b0:b1_], True)
                v = dequantize_blockwise(st["exp_avg_sq_code"][lo:hi], st["exp_avg_sq_absmax"][b0:b1_], False)
                apply(flat[lo:hi], grad[lo:hi], m, v)
                for key, val, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
                    codes, absmax = quantize_blockwise(val, signed)
                    st[f"{key}_code"][lo:hi] = codes
                    st[f"{key}_absmax"][b0:b1_] = absmax
        if flat.data_ptr() != p.data_ptr():
            p.copy_(flat.view_as(p))

    # ---- checkpoints: plain tensors and numbers --------------------------------------------
    def state_dict(self) -> dict:
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        state = {}
        for g in self.param_groups:
            for p in g["params"]:
                if self.state.get(p):
                    state[index[id(p)]] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                                           for k, v in self.state[p].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state: its parameter groups do not match this optimizer's")
        by_id = {}
        for saved, mine in zip(groups, self.param_groups):
            for i, p in zip(saved["params"], mine["params"]):
                by_id[int(i)] = p
            for k, v in saved.items():
                if k != "params":
                    mine[k] = tuple(v) if k == "betas" else v
        self.state.clear()
        for i, s in state_dict["state"].items():
            p = by_id[int(i)]
            fresh = self._new_state(p)
            if set(fresh) != set(s):
                raise ValueError(f"optimizer state of parameter {i}: keys {sorted(s)} are not an 8-bit AdamW "
                                 f"state for {p.numel()} values (expected {sorted(fresh)})")
            for k, v in s.items():
                if isinstance(fresh[k], torch.Tensor):
                    if tuple(v.shape) != tuple(fresh[k].shape) or v.dtype != fresh[k].dtype:
                        raise ValueError(f"optimizer state of parameter {i}: {k} is {v.dtype} {tuple(v.shape)}, "
                                         f"expected {fresh[k].dtype} {tuple(fresh[k].shape)}")
                    fresh[k].copy_(v)
                else:
                    fresh[k] = int(v.item() if isinstance(v, torch.Tensor) else v)
            self.state[p] = fresh


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:      # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def make_optimizer(name: str, params: list, *, lr: float, weight_decay: float = 0.0,
                   fsdp: bool = False) -> torch.optim.Optimizer:
    """The optimizer `training.optimizer` names, over `params`."""
    if name == "adamw":
        # on CUDA the fused kernel: one launch for every parameter's update instead of a dozen
        # multi-tensor launches (foreach) - or one per parameter per op without either
        fused = not fsdp and bool(params) and all(type(p) is torch.nn.Parameter and p.is_cuda
                                                  and p.dtype == torch.float32 for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        if fsdp:
            raise ValueError(f"training.optimizer: {name} keeps whole-parameter 8-bit blocks and cannot update "
                             f"FSDP's sharded parameters; use adamw with fsdp, or ddp")
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, paged=name == "paged_adamw_8bit")
    raise ValueError(f"training.optimizer: unknown {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def nbytes_on_device(opt: torch.optim.Optimizer) -> Optional[int]:
    """State bytes held on an accelerator between steps (0 for the paged optimizer)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device.type != "cpu")
