"""Compiled regions: `torch.compile` of each transformer block (`training.compile`).

A decoder step in eager mode is a long row of small kernels, each launched from
Python; on a GPU the first measured step was bound by those launches, not by the
arithmetic (device README). Compiling a block lets TorchInductor fuse its
elementwise work (norms, rotary embedding, SwiGLU, residual adds, the LoRA
updates) into a few generated kernels and launch them with far less Python in
between. Every block of a model is the same code with other weights, so one
compiled graph serves them all (parameters are graph inputs), and the first step
pays the compile once, not once per block.

Shapes: with compile on, each batch is padded (masked) to a multiple of
`COMPILE_BUCKET` tokens, so the blocks see a few lengths rather than one per batch; a
new length compiles again until dynamo marks the length dynamic (its default). Our own fused kernels (engine.kernels, engine.fused) step
aside inside compiled regions (`in_compiled_region`): Inductor fuses the same ops
itself and sees through them.

The loss (engine.train's chunked cross-entropy) stays eager: it is a few large
GEMMs per chunk, where compiling buys nothing.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .arch import blocks

COMPILE_BUCKET = 64     # tokens: compiled runs pad each batch's length up to a multiple of this


def in_compiled_region() -> bool:
    """True while dynamo traces a compiled region (our fused kernels then take torch ops)."""
    return bool(torch.compiler.is_compiling())


def backend() -> str:
    """STUDIO_COMPILE_BACKEND: `inductor` (default; generated kernels) or another torch.compile
    backend, e.g. `aot_eager` (the same graph capture and autograd, no code generation: how the
    CPU tests check that the blocks compile and train the same)."""
    return os.environ.get("STUDIO_COMPILE_BACKEND", "inductor").strip() or "inductor"


def compile_blocks(model: nn.Module, setting: bool | str = True) -> int:
    """Compile every transformer block of `model` in place (nn.Module.compile) as
    `training.compile` says (`True`, or `"cudagraphs"`: Inductor's `reduce-overhead` mode,
    which records each compiled block as a CUDA graph and replays it: one launch per block
    and direction instead of one per kernel); returns how many. Training and evaluation both
    go through the compiled blocks; state dicts, parameter names and adapters are unchanged
    (the modules themselves stay)."""
    layers = blocks(model)
    name = backend()
    mode = "reduce-overhead" if setting == "cudagraphs" and name == "inductor" else None
    for block in layers:
        block.compile(backend=name, mode=mode)
    return len(layers)


def step_begin(setting: bool | str) -> None:
    """Before each training step of a `cudagraphs` run: tells the CUDA-graph trees a new
    iteration starts, so the graphs' output buffers of the last step may be reused."""
    if setting == "cudagraphs":
        torch.compiler.cudagraph_mark_step_begin()
