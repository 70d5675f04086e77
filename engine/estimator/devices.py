"""Rows per device for a run on `world_size` devices.

DDP (PyTorch DistributedDataParallel) keeps a whole replica on every rank and
each rank trains on its own `batch_size`: per-device rows equal one process's.

FSDP2 (`torch.distributed.fsdp.fully_shard` on every decoder block, then on the
root module) keeps 1/N of every parameter, gradient and optimizer state on each
rank (Zhao et al. 2023, "PyTorch FSDP"). To compute, a rank all-gathers the full
parameters of the unit it runs: one decoder block at a time, plus the next one
that FSDP2 prefetches while the current one computes, and the root's own
parameters (embeddings, final norm, heads), which FSDP2 keeps gathered for the
whole step. A block's full gradient lives until it is reduce-scattered right
after that block's backward; the root's until the end of backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..dims import ModelDims
from .counts import block_linear_weights, block_params
from .formulas import nf4_bytes, step_total

STRATEGIES = ("ddp", "fsdp")
PREFETCHED_BLOCKS = 1        # FSDP2 all-gathers the next block while the current one runs


@dataclass(frozen=True)
class GatheredUnits:
    """Bytes one FSDP rank holds in full on top of its shards."""

    root_weights: int        # the root's parameters (non-block base ones and the method's outside blocks)
    block_weights: int       # one decoder block as stored (NF4 where quantized), with the method's parameters
    blocks: int              # how many blocks are gathered at once
    block_grads: int         # one trainable block's full gradient
    root_grads: int          # the root's trainable parameters' full gradient

    @property
    def weights(self) -> int:
        return self.root_weights + self.blocks * self.block_weights

    @property
    def gradients(self) -> int:
        return self.block_grads + self.root_grads


def gathered_units(dims: ModelDims, *, n_params: int, n_tr: int, added: int, size: int, quant: str,
                   trains_base_weights: bool, trained_layers: int, master: int = None) -> GatheredUnits:
    """What FSDP2 materialises per rank. `trained_layers`: how many blocks hold
    trainable parameters; the method's added and trainable parameters are
    spread evenly over them (the rest are the root's: prompts, the task head).
    Gathered parameters take `size` bytes (FSDP2 gathers in the compute dtype), the
    gradients `master` (fp32 reduction; default `size`, as the slide's formulas count)."""
    master = size if master is None else master
    L, bp = dims.num_layers, block_params(dims)
    if quant != "none" and not trains_base_weights:
        lw = block_linear_weights(dims)
        block_base = nf4_bytes(lw, quant) + size * (bp - lw)
    else:
        block_base = size * bp
    lt = max(0, min(trained_layers, L))
    added_per_block = math.ceil(added / lt) if lt else 0
    trainable_per_block = min(bp + added_per_block, math.ceil(n_tr / lt)) if lt else 0
    root_params = max(0, n_params - L * bp)
    root_added = max(0, added - added_per_block * lt)
    # FSDP2's MixedPrecisionPolicy gathers every parameter in the compute dtype (`size`), fp32 masters too
    return GatheredUnits(root_weights=size * (root_params + root_added),
                         block_weights=block_base + size * added_per_block,
                         blocks=min(L, 1 + PREFETCHED_BLOCKS),
                         block_grads=master * trainable_per_block,
                         root_grads=master * max(0, n_tr - trainable_per_block * lt))


def per_device_rows(rows: dict, *, world_size: int, strategy: str, units: GatheredUnits,
                    step_temporary: Optional[int] = None) -> dict:
    """The rows one device holds. One device, or DDP: the rows as they are.
    FSDP on N devices: ⌈weights/N⌉ + gathered weights, ⌈gradients/N⌉ + gathered
    gradients, ⌈optimizer/N⌉; CUDA context and hidden states (per-rank batch)
    unchanged. `total`: the sum of the rows (the slide's reading), or, given the
    optimizer's `step_temporary` (the `model` formula), the step's peak
    (formulas.step_total)."""
    out = dict(rows)
    out.pop("total", None)
    n = world_size if world_size > 1 and strategy == "fsdp" else 1
    if n > 1:
        out["weights"] = -(-rows["weights"] // n) + units.weights
        out["gradients"] = -(-rows["gradients"] // n) + units.gradients
        out["optimizer"] = -(-rows["optimizer"] // n)
    if step_temporary is None:
        out["total"] = sum(out.values())
    else:
        out["total"] = step_total(out, -(-step_temporary // n))
    return out
