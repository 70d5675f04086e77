"""4-bit NormalFloat (NF4) quantization with double quantization, in plain torch.

Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of
Quantized LLMs", NeurIPS 2023, arXiv:2305.14314.

A weight is cut into blocks of 64 values; each block is divided by its absolute
maximum and every value is replaced by the index (4 bits) of the nearest of the
16 NF4 code values; two indices are packed per uint8. With double quantization
the per-block absmax constants (fp32) are themselves quantized to 8 bits in
blocks of 256 with one fp32 scale per block: 4 + 8/64 + 32/(64*256) = 4.127 bits
per weight, against 4 + 32/64 = 4.5 without. The stored absmax is rounded up, and
the 4-bit codes are chosen against the stored (dequantized) absmax, so every
scaled value lies in [-1, 1]. Device-agnostic: the same code runs on CPU and CUDA
and gives the same codes and weights on both (no division by a Python number,
which CUDA computes as a multiplication by the rounded reciprocal: 126 of the 256
possible absmax codes would come out one ulp apart). Dequantization takes one fused
pass where it can: the Triton kernel (engine.kernels) on CUDA, the C kernel
(engine.fused) on fp32 CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import fused, kernels

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK = 64
DQ_BLOCK = 256


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


_codes: dict[torch.device, torch.Tensor] = {}


def _code_on(device: torch.device) -> torch.Tensor:
    """The code values on `device`, made once (dequantization runs per layer per step:
    no host-to-device copy each time). Not to be written into."""
    if device not in _codes:
        _codes[device] = nf4_code(device)
    return _codes[device]


def _exact_div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor, correctly rounded on every device: CUDA turns a division by a
    Python number into a multiplication by its reciprocal, a division by a tensor it
    does not."""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


@dataclass
class QuantState:
    """Everything needed to rebuild the weight."""

    shape: tuple[int, ...]
    numel: int
    packed: torch.Tensor             # uint8, ceil(numel_padded / 2)
    absmax: torch.Tensor             # fp32 per block (no double quant) or uint8 codes (double quant)
    absmax_scale: torch.Tensor | None  # fp32 per DQ block (double quant) else None
    block_size: int = BLOCK
    dq_block_size: int = DQ_BLOCK

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def storage_bits(self) -> int:
        bits = self.packed.numel() * 8
        bits += self.absmax.numel() * self.absmax.element_size() * 8
        if self.absmax_scale is not None:
            bits += self.absmax_scale.numel() * self.absmax_scale.element_size() * 8
        return bits

    def bits_per_param(self) -> float:
        return self.storage_bits() / self.numel


def quantize_absmax(absmax: torch.Tensor, dq_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes (uint8) and per-block fp32 scales for the positive absmax values.
    Codes round up so the dequantized absmax never falls below the true one."""
    n = absmax.numel()
    pad = (-n) % dq_block
    a = torch.cat([absmax, absmax.new_zeros(pad)]).view(-1, dq_block)
    scale = a.max(dim=1).values.clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.ceil(a / scale[:, None] * 255.0).clamp(0, 255).to(torch.uint8)   # divides by a tensor: exact anywhere
    return q.view(-1)[:n].contiguous(), scale.contiguous()


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, dq_block: int) -> torch.Tensor:
    n = q.numel()
    pad = (-n) % dq_block
    qf = torch.cat([q.float(), q.new_zeros(pad, dtype=torch.float32)]).view(-1, dq_block)
    return (_exact_div(qf, 255.0) * scale[:, None]).view(-1)[:n]


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK, double_quant: bool = True,
                 dq_block_size: int = DQ_BLOCK) -> QuantState:
    w = weight.detach().float().reshape(-1)
    numel = w.numel()
    pad = (-numel) % block_size
    if pad:
        w = torch.cat([w, w.new_zeros(pad)])
    blocks = w.view(-1, block_size)
    absmax = blocks.abs().max(dim=1).values
    if double_quant:
        q_absmax, scale = quantize_absmax(absmax, dq_block_size)
        used = dequantize_absmax(q_absmax, scale, dq_block_size)
    else:
        q_absmax, scale, used = absmax.clone(), None, absmax
    normed = blocks / used.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = nf4_code(w.device)
    mids = (code[1:] + code[:-1]) * 0.5
    idx = torch.bucketize(normed.reshape(-1), mids).to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = (idx[0::2] << 4) | idx[1::2]
    return QuantState(tuple(weight.shape), numel, packed.contiguous(), q_absmax, scale, block_size, dq_block_size)


def dequantize_nf4(qs: QuantState, dtype: torch.dtype = torch.float32, packed=None, absmax=None,
                   absmax_scale=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight back, in `dtype`. The tensors may be given explicitly (when a
    module holds them as parameters/buffers that moved device). `out`: a buffer of
    `numel` elements to write into, where a fused kernel applies: fp32 for the CPU
    kernel, `dtype` for the Triton kernel (ignored otherwise)."""
    packed = qs.packed if packed is None else packed
    absmax = qs.absmax if absmax is None else absmax
    absmax_scale = qs.absmax_scale if absmax_scale is None else absmax_scale
    code = _code_on(packed.device)
    if kernels.applies(absmax if absmax_scale is None else absmax_scale):   # one Triton pass, straight to dtype
        if out is not None and (out.dtype != dtype or out.device != packed.device or out.numel() != qs.numel):
            out = None
        return kernels.ops().nf4_dequantize(packed, code, absmax, absmax_scale, qs.numel, qs.block_size,
                                            qs.dq_block_size, dtype, out).view(qs.shape)
    if absmax_scale is not None:
        absmax = dequantize_absmax(absmax, absmax_scale, qs.dq_block_size)
    if fused.applies(absmax):                         # one C pass on CPU (engine.fused)
        if dtype is not torch.float32:
            out = None
        return fused.nf4_dequantize(packed, code, absmax, qs.numel, qs.block_size, out).view(qs.shape).to(dtype)
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1).long()
    vals = code[idx].view(-1, qs.block_size)
    w = (vals * absmax[:, None].float()).view(-1)[: qs.numel]
    return w.view(qs.shape).to(dtype)


def quantization_error(weight: torch.Tensor, block_size: int = BLOCK, double_quant: bool = True) -> dict:
    """How far NF4 lands from the fp32 weight: max and mean absolute error, RMSE,
    relative Frobenius error and the stored bits per parameter."""
    w = weight.detach().float()
    qs = quantize_nf4(w, block_size, double_quant)
    err = dequantize_nf4(qs) - w
    return {
        "numel": w.numel(),
        "max_abs_error": err.abs().max().item(),
        "mean_abs_error": err.abs().mean().item(),
        "rmse": err.pow(2).mean().sqrt().item(),
        "relative_fro_error": (err.norm() / w.norm().clamp_min(1e-30)).item(),
        "bits_per_param": qs.bits_per_param(),
    }


def summarize_errors(per_module: dict[str, dict]) -> dict:
    """Parameter-weighted totals over modules (same keys as quantization_error)."""
    n = sum(v["numel"] for v in per_module.values())
    if not n:
        return {"numel": 0}
    return {
        "numel": n,
        "max_abs_error": max(v["max_abs_error"] for v in per_module.values()),
        "mean_abs_error": sum(v["mean_abs_error"] * v["numel"] for v in per_module.values()) / n,
        "rmse": math.sqrt(sum(v["rmse"] ** 2 * v["numel"] for v in per_module.values()) / n),
        "bits_per_param": sum(v["bits_per_param"] * v["numel"] for v in per_module.values()) / n,
    }
