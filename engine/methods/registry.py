"""The built-in methods: one line per method, in the order the studio lists them.
Adding a method is one new module in engine/methods/ ending with its `SPEC`, and
one line here (see docs/adding-a-method.md)."""

from __future__ import annotations

from . import (adalora, bitfit, dora, full, houlsby, ia3, llama_adapter, ln_tuning, lora, mam, p_tuning,
               parallel_adapter, prefix, prompt_tuning, qlora, s4, top_k)
from . import loha, lokr, oft, vera
from . import intrinsic_dimension
from . import compacter, unipelt
from . import hyperformer
from .base import MethodSpec

SPECS: list[MethodSpec] = [
    lora.SPEC,
    dora.SPEC,
    adalora.SPEC,
    qlora.SPEC,
    ia3.SPEC,
    loha.SPEC,
    lokr.SPEC,
    vera.SPEC,
    oft.SPEC,
    intrinsic_dimension.SPEC,
    bitfit.SPEC,
    ln_tuning.SPEC,
    full.SPEC,
    top_k.SPEC,
    houlsby.SPEC,
    parallel_adapter.SPEC,
    prompt_tuning.SPEC,
    p_tuning.SPEC,
    prefix.SPEC,
    llama_adapter.SPEC,
    mam.SPEC,
    s4.SPEC,
    compacter.SPEC,
    unipelt.SPEC,
    hyperformer.SPEC,
]
