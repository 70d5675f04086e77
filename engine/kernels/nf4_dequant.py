"""NF4 dequantization (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", arXiv:2305.14314) straight into bf16, fp16 or fp32, one Triton
kernel for the storage of engine.methods.nf4: packed uint8 codes, two per byte
(high nibble first), one absmax per `block` weights, either fp32 or, with double
quantization, uint8 codes with one fp32 scale per `dq_block` absmax values.

    absmax[b] = q[b] / 255 * scale[b // dq_block]        (double quantization)
    w[i]      = code[nibble(i)] * absmax[i // block]

in exactly the CPU path's order of operations and roundings (each a correctly
rounded fp32 operation: the division is Triton's IEEE `div_rn`, not its default
approximate one, and there is no add for the compiler to fuse into an FMA), so fp32
weights are bit for bit the CPU path's, and bf16/fp16 weights are those rounded
once. One pass: torch makes an int64 index tensor, a gathered copy, the absmax
arithmetic and a scaled copy, and a cast when the compute dtype is not fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import check_float, launch

BLOCK = 1024


@triton.jit
def _nf4_kernel(packed_ptr, code_ptr, absmax_ptr, scale_ptr, out_ptr, numel,
                QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    # the quantization blocks are compile-time constants (64 and 256 in practice): a
    # division by them is a shift, where a runtime one is a 64-bit integer division
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((offs & 1) == 1, byte & 15, byte >> 4)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    b = offs // QBLOCK
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + b // DQ_BLOCK, mask=mask, other=0.0)
        absmax = tl.math.div_rn(q, 255.0) * scale
    else:
        absmax = tl.load(absmax_ptr + b, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (value * absmax).to(out_ptr.dtype.element_ty), mask=mask)


def nf4_dequantize(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                   absmax_scale: Optional[torch.Tensor], numel: int, block: int, dq_block: int,
                   dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first `numel` weights, flat, in `dtype`. packed: uint8; code: the 16 fp32
    code values; absmax: fp32 per block, or uint8 codes when `absmax_scale` (fp32 per
    dq block) is given. Written into `out` (contiguous, `numel` elements of `dtype`)
    when given."""
    check_float("nf4_dequantize: dtype", torch.empty(0, dtype=dtype))
    dq = absmax_scale is not None
    blocks = -(-numel // block)
    if packed.dtype != torch.uint8 or code.numel() != 16 or packed.numel() * 2 < numel or block % 2 \
            or absmax.numel() < blocks or (dq and absmax_scale.numel() * dq_block < blocks):
        raise ValueError(f"nf4_dequantize: {packed.numel()} packed bytes, {absmax.numel()} blocks of {block} "
                         f"for {numel} weights")
    if dq and (absmax.dtype != torch.uint8 or absmax_scale.dtype != torch.float32):
        raise ValueError(f"nf4_dequantize: double-quantized absmax must be uint8 codes with fp32 scales, "
                         f"got {absmax.dtype} and {absmax_scale.dtype}")
    if not dq and absmax.dtype != torch.float32:
        raise ValueError(f"nf4_dequantize: absmax must be fp32, got {absmax.dtype}")
    tensors = [packed, code, absmax] + ([absmax_scale] if dq else [])
    if any(t.device != packed.device for t in tensors):
        raise ValueError("nf4_dequantize: packed codes, code values and absmax must be on one device")
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    elif out.dtype != dtype or out.numel() != numel or not out.is_contiguous() or out.device != packed.device:
        raise ValueError(f"nf4_dequantize: out must be a contiguous {dtype} tensor of {numel} elements "
                         f"on {packed.device}")
    if numel == 0:
        return out
    packed, code, absmax = packed.contiguous(), code.to(torch.float32).contiguous(), absmax.contiguous()
    scale = absmax_scale.contiguous() if dq else absmax
    launch(_nf4_kernel, (triton.cdiv(numel, BLOCK),), packed, packed, code, absmax, scale, out, numel,
           QBLOCK=block, DQ_BLOCK=dq_block if dq else 1, DOUBLE_QUANT=dq, BLOCK=BLOCK, num_warps=4)
    return out
