"""What a method trains, block by block, as far as saved activations are concerned.

Each method's spec carries a `plan(dims, method_cfg, task) -> Plan` function; the
estimator (`engine.estimator`) turns a Plan into the bytes of saved hidden states.
This module holds only the data types and helpers those functions share, so method
modules can build plans without importing the estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerPlan:
    """What trains in one block, as far as saved activations are concerned."""

    full: set = field(default_factory=set)         # block-relative paths of linears whose weight trains
    lora: dict = field(default_factory=dict)       # path -> (rank, dropout)
    dora: bool = False
    ia3: set = field(default_factory=set)          # "k", "v", "ff": scaled tensors (IA³)
    norms: bool = False                            # block norms train (ln_tuning, full, houlsby)
    adapters: list = field(default_factory=list)   # ("serial"|"parallel", site "attn"|"ffn", width)
    prefix: int = 0                                # extra key/value positions (prefix tuning, llama-adapter)
    adaption_prompt: int = 0                       # llama-adapter's gated adapter tokens
    bias: bool = False                             # linear biases train (BitFit): grads flow, nothing extra saved

    def trains_anything(self) -> bool:
        return bool(self.full or self.lora or self.ia3 or self.norms or self.adapters or self.prefix
                    or self.adaption_prompt or self.bias)


@dataclass
class Plan:
    layers: list                                   # LayerPlan per block
    prompt_tokens: int = 0                         # virtual tokens prepended to the input
    embeddings: bool = False                       # embeddings train (full)
    input_grad: bool = False                       # the input embeddings require grad (prompts, bitfit on BERT)
    final_norm: bool = False
    lm_head: bool = False
    pooler: bool = False
    head: bool = True                              # classification head
    notes: list = field(default_factory=list)
