"""The rows every formula shares: units, the slide's and the appendix's hidden-state
rules, and the `model` formula's weights and optimizer-state bytes."""

from __future__ import annotations

import math

from ..dims import ModelDims
from .catalog import GiB
from .counts import frozen_linear_params

ROWS = ("cuda_context", "weights", "gradients", "hidden_states", "optimizer", "total")
FORMULAS = ("slide", "appendix", "model")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
QUANTS = ("none", "nf4", "nf4-dq")
# The run config's optimizers (training.optimizer), and plain SGD without momentum for comparisons.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
OPTIMIZER_ALIASES = {"adamw8bit": "adamw_8bit"}       # the estimator's earlier spelling
TASKS = ("classification", "causal_lm")
ATTENTIONS = ("sdpa", "eager", "flash")
DEVICES = ("cuda", "cpu")

CUDA_CONTEXT_BYTES = 1 * GiB          # the slide's "≈ 1 GB"; kernels + cuBLAS workspace on a recent GPU
NF4_BLOCK = 64                        # weights per fp32 (or 8-bit) absmax constant
NF4_DQ_BLOCK = 256                    # 8-bit absmax constants per fp32 scale (double quantization)
NF4_BITS = 4 + 32 / NF4_BLOCK                                   # 4.5 bits / weight
NF4_DQ_BITS = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)  # 4.127 bits / weight
ADAM8_BLOCK = 2048                    # block-wise 8-bit optimizer states (Dettmers et al. 2022)

FORMULA_TEXT = {
    "slide": "weights size·N; gradients size·N_trainable; optimizer 2·size·N_trainable; CUDA ≈ 1 GiB; "
             "hidden states size·L·(20·H·seq + 3·seq²)·bs with H = attention heads",
    "appendix": "slide rows; hidden states size·(3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + vocab·seq·bs)",
    "model": "exact parameter counts (NF4 with block constants); optimizer states by kind; hidden states = "
             "tensors autograd saves in our training loop, walked per layer for this architecture and method",
}


def slide_hidden_states(dims: ModelDims, size: int, batch: int, seq: int) -> int:
    """size·L·(20·H·seq + 3·seq²)·bs, H = number of attention heads (the reading
    that reproduces the slide's Llama-2-7B numbers; see docs/estimator.md)."""
    return size * dims.num_layers * (20 * dims.num_heads * seq + 3 * seq * seq) * batch


def appendix_hidden_states(dims: ModelDims, size: int, batch: int, seq: int) -> int:
    """size·(3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + vocab·seq·bs), verbatim."""
    h, L, a, V = dims.hidden_size, dims.num_layers, dims.num_heads, dims.vocab_size
    return size * (3 * h * seq * batch + 18 * L * h * seq * batch + 3 * L * a * seq * seq * batch + V * seq * batch)


def simple_rows(n: int, n_tr: int, size: int, hidden: int) -> dict:
    """The slide's rows: weights, gradients and two optimizer states in `size` bytes."""
    rows = {"cuda_context": CUDA_CONTEXT_BYTES, "weights": size * n, "gradients": size * n_tr,
            "hidden_states": hidden, "optimizer": 2 * size * n_tr}
    rows["total"] = sum(rows.values())
    return rows


def quant_of(spec, method_cfg, quant: str) -> str:
    """A method that quantizes the frozen base itself (QLoRA) stores it as nf4
    (nf4-dq with its default double quantization) even when quant='none'."""
    if spec.quantizes_base and quant == "none":
        return "nf4-dq" if getattr(method_cfg, "double_quant", True) else "nf4"
    return quant


def nf4_bytes(n_weights: int, quant: str) -> int:
    """Bytes of `n_weights` NF4 weights with their block constants."""
    return math.ceil(n_weights * (NF4_DQ_BITS if quant == "nf4-dq" else NF4_BITS) / 8)


MASTER_BYTES = 4                      # trainable parameters, their gradients and AdamW states: fp32 (master weights)


def model_weight_bytes(dims: ModelDims, n_params: int, added: int, size: int, quant: str,
                       trains_base_weights: bool, n_tr: int = 0) -> int:
    """The base model's parameters plus the method's added ones, as the engine holds
    them under the precision contract (docs/precision.md): every trainable parameter
    (`n_tr`: the method's own and any trainable base weight or head) in fp32, the
    frozen rest in the run's dtype (`size` bytes), and the frozen block linears in NF4
    (4 bits + block constants) when quantized. Methods that train the block linears
    themselves are never quantized. With `size` = 4 (fp32) this is 4·(N + added)."""
    frozen = n_params + added - n_tr
    fp32_norms = frozen_fp32_norm_params(dims, size, n_tr, frozen)
    rest = size * (frozen - fp32_norms) + MASTER_BYTES * (n_tr + fp32_norms)
    if quant == "none" or trains_base_weights:
        return rest
    q = frozen_linear_params(dims)
    return nf4_bytes(q, quant) + rest - size * q


def frozen_fp32_norm_params(dims: ModelDims, size: int, n_tr: int, frozen: int) -> int:
    """LayerNorm parameters a 16-bit run keeps in fp32 although frozen
    (engine.precision.keeps_fp32): every block's two and the embeddings' one, when no
    norm trains (at most the `frozen` count: `full` has none frozen; `ln_tuning`, whose
    trainable norms are counted fp32 already, is overstated by their 2 extra bytes each)."""
    if size == MASTER_BYTES or dims.norm != "layernorm":
        return 0
    arch = dims.arch
    n = dims.num_layers * len(arch.block_norms()) - (1 if arch.first_attn_norm_identity and dims.num_layers else 0)
    n += sum(1 for p in (arch.embed_norm, arch.final_norm) if p) + (1 if arch.pooler_norm else 0)
    return min(frozen, n * dims.norm_params())


def optimizer_step_temporary(dims: ModelDims, n_tr: int, optimizer: str, device: str, embeddings: bool) -> int:
    """Bytes AdamW allocates on top of its states while it steps (torch.optim.AdamW):
    on CUDA its multi-tensor (foreach) path makes one fp32 temporary for all trainable
    parameters at once (sqrt of the second moments); on CPU the single-tensor path
    makes one per parameter, so the largest trainable parameter's (the embeddings when
    they train, else at most a block linear). 8-bit AdamW and SGD: none counted."""
    if optimizer != "adamw" or not n_tr:
        return 0
    if device == "cuda":
        return MASTER_BYTES * n_tr
    largest = dims.vocab_size * dims.hidden_size if embeddings else \
        dims.hidden_size * max(dims.intermediate_size, dims.hidden_size)
    return MASTER_BYTES * min(n_tr, largest)


def step_total(rows: dict, step_temporary: int) -> int:
    """The step's peak, from the rows: weights and optimizer states live throughout;
    the saved activations are freed during backward while the gradients are made, and
    the optimizer steps once they are all made, so the peak is the larger of the
    activations (with the gradients made so far: small whenever the activations are the
    larger) and the gradients plus the optimizer's step temporary."""
    return (rows["cuda_context"] + rows["weights"] + rows["optimizer"]
            + max(rows["hidden_states"], rows["gradients"] + step_temporary))


def optimizer_bytes(n_tr: int, size: int, optimizer: str) -> int:
    """AdamW: two states like the parameter (PyTorch keeps exp_avg and exp_avg_sq in
    the parameter's dtype; trainable parameters are fp32 master weights, so `size` is
    MASTER_BYTES for the `model` formula); 8-bit AdamW (paged or not; Dettmers et al.
    2022): two 1-byte states plus two fp32 constants per block of 2048; plain SGD (no
    momentum): nothing."""
    if optimizer == "adamw":
        return 2 * size * n_tr
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * (n_tr + 4 * math.ceil(n_tr / ADAM8_BLOCK))
    return 0
