"""What every launch of the Triton kernels checks and chooses: dtypes, contiguity,
the device to launch on, block sizes and warps by row width."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import torch
import triton

from . import FLOAT_DTYPES

# widest row one program holds in registers (RMSNorm); every LLM's hidden size is below
MAX_ROW = 65536
# columns of a logits row one program sweeps at a time (cross-entropy loops over the row)
XENT_BLOCK = 4096


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported by the Triton kernels "
                         f"(bf16, fp16 or fp32)")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: the Triton kernels need a contiguous tensor, got strides {t.stride()}")


# launches per kernel since the process started (tests and benchmarks read it
# through engine.kernels.launch_counts)
LAUNCHES: Counter = Counter()


def launch(kernel, grid: tuple, on: torch.Tensor, *args, **meta) -> None:
    """kernel[grid](*args, **meta) with `on`'s GPU the current device (a no-op for
    CPU tensors, which only the interpreter runs), counted in LAUNCHES."""
    LAUNCHES[_name(kernel)] += 1
    # switching the current device costs two driver calls a launch; a process (or rank) normally
    # computes on its current device already, so switch only when the tensor lives elsewhere
    if on.device.type == "cuda" and on.device.index is not None and on.device.index != torch.cuda.current_device():
        with torch.cuda.device(on.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


@lru_cache(maxsize=None)
def _name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def row_block(cols: int, name: str) -> int:
    """The power-of-two block holding a row of `cols` elements."""
    if cols > MAX_ROW:
        raise ValueError(f"{name}: rows of {cols} elements are wider than the kernels' {MAX_ROW}")
    return triton.next_power_of_2(cols)


def warps_for(block: int) -> int:
    """Warps for a program that sweeps `block` elements: about 256 elements per warp,
    between 1 and 16 warps."""
    return max(1, min(16, block // 256))


@lru_cache(maxsize=None)
def programs_for(device: torch.device) -> int:
    """How many programs a grid-stride kernel (one that loops over rows) launches:
    a few per streaming multiprocessor on a GPU, a handful in the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
