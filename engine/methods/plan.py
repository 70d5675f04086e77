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
    adapter_saved: dict = field(default_factory=dict)  # site -> (elements per token, token-independent elements)
    #                                                    an adapter keeps beyond the bottleneck (HyperFormer)
    prefix: int = 0                                # extra key/value positions (prefix tuning, llama-adapter)
    adaption_prompt: int = 0                       # llama-adapter's gated adapter tokens
    bias: bool = False                             # linear biases train (BitFit): grads flow, nothing extra saved
    weight_saved: dict = field(default_factory=dict)  # path -> token-independent elements kept (LoHa/LoKr ΔW, OFT's R)
    expert_lora: dict = field(default_factory=dict)   # expert tensor path (mlp.experts.gate_up_proj) -> LoRA rank

    def trains_anything(self) -> bool:
        return bool(self.full or self.lora or self.ia3 or self.norms or self.adapters or self.prefix
                    or self.adaption_prompt or self.bias or self.weight_saved or self.expert_lora)


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


# ---- helpers the methods' plan functions share ----------------------------------------------------

def empty_plan(dims) -> Plan:
    """A plan in which nothing in the blocks trains (one LayerPlan per block)."""
    return Plan(layers=[LayerPlan() for _ in range(dims.num_layers)])


def block_paths(dims) -> list[str]:
    """Block-relative paths of a block's linear layers (and of its experts and router,
    whose weights train with the block's in full / top_k)."""
    ex = dims.arch.experts
    return [s.path for s in dims.block_linears()] + ([ex.router, ex.path] if ex else [])


def layers_subset(dims, layers) -> list[int]:
    """The block indices a `layers` option names (None or empty: every block); indices
    out of range are left out (the method's own count reports them)."""
    return list(range(dims.num_layers)) if not layers else [i for i in layers if 0 <= i < dims.num_layers]


def ranks_per_layer(dims, ranks: dict) -> dict[int, dict[str, int]]:
    """{full module name: rank} -> {block index: {block-relative path: rank}}; names
    outside the blocks are dropped."""
    prefix = dims.arch.blocks_path + "."
    out: dict[int, dict[str, int]] = {}
    for name, r in ranks.items():
        if not name.startswith(prefix):
            continue
        i, path = name[len(prefix):].split(".", 1)
        out.setdefault(int(i), {})[path] = r
    return out


def low_rank_plan(dims, ranks: dict, dropout: float, dora: bool = False) -> Plan:
    """The plan of the LoRA family: each target linear gets a rank-r update (and DoRA's
    magnitude scaling) on its input, with the method's dropout."""
    plan = empty_plan(dims)
    for i, d in ranks_per_layer(dims, ranks).items():
        plan.layers[i].lora = {p: (r, dropout) for p, r in d.items()}
        plan.layers[i].dora = dora
    return plan
