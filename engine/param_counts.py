"""Exact parameter counts of a transformers model from its ModelDims: embeddings,
blocks (linears, norms, q/k norms, experts and router), the body's tail (final
norm, pooler, LM head) and the classification head. The estimator (engine.estimator.counts)
and the methods' exact counts (engine.methods) both count with these."""

from __future__ import annotations

from .dims import ModelDims


def linear_params(in_f: int, out_f: int, bias: bool) -> int:
    return in_f * out_f + (out_f if bias else 0)


def norm_params(dims: ModelDims) -> int:
    return dims.norm_params()


def block_params(dims: ModelDims, layer: int = 1) -> int:
    """Parameters of one transformer block: linears, norms (q/k norms included), experts and router."""
    lin = sum(linear_params(s.in_features, s.out_features, s.bias) for s in dims.block_linears())
    return lin + dims.block_norm_params(layer) + dims.expert_params()


def all_blocks_params(dims: ModelDims) -> int:
    n = dims.num_layers * block_params(dims)
    if dims.arch.first_attn_norm_identity and dims.num_layers:
        n -= norm_params(dims)                           # ModernBERT's block 0: no attention norm
    return n


def embedding_params(dims: ModelDims) -> int:
    arch, h = dims.arch, dims.hidden_size
    e = dims.embedding_size or h
    n = dims.vocab_size * e
    if arch.embedding_projection and e != h:
        n += e * h                                       # DeBERTa's embed_proj (no bias)
    if arch.positions == "learned" or (arch.positions == "relative" and dims.position_biased_input):
        n += dims.max_position_embeddings * h
    n += dims.type_vocab_size * h
    if arch.embed_norm:
        n += norm_params(dims)
    return n


def relative_position_params(dims: ModelDims) -> int:
    """DeBERTa's relative position embeddings, their norm and (unshared) position projections."""
    return dims.relative_params


def body_head_params(dims: ModelDims, task: str) -> int:
    """Everything after the blocks except the trainable task head: final norm, pooler,
    LM head (when not tied), an encoder's masked-LM transform."""
    arch, h = dims.arch, dims.hidden_size
    n = norm_params(dims) if arch.final_norm else 0
    if arch.is_encoder:
        if task == "classification":
            if arch.pooler:
                ph = dims.pooler_hidden_size or h
                n += linear_params(ph, ph, arch.pooler_bias)
                if arch.pooler_norm:
                    n += norm_params(dims)
            return n
        if arch.mlm_head:         # transform dense + LayerNorm + decoder bias (decoder weight tied)
            n += linear_params(h, h, True) + 2 * h + dims.vocab_size
        return n
    if task == "causal_lm" and not dims.tie_word_embeddings:
        n += dims.vocab_size * h
    return n


def head_params(dims: ModelDims, task: str, num_labels: int) -> int:
    """The task head that a prepared run trains (classifier / score); 0 for causal LM."""
    if task != "classification":
        return 0
    arch, h = dims.arch, dims.hidden_size
    n = 0
    for _ in arch.classifier[:-1]:
        n += linear_params(h, h, arch.classifier_bias)
    return n + linear_params(dims.pooler_hidden_size or h if arch.pooler else h, num_labels, arch.classifier_bias)


def total_params(dims: ModelDims, task: str, num_labels: int = 2) -> int:
    """Exact parameter count of the transformers model for `task`, tied weights once."""
    return (embedding_params(dims) + all_blocks_params(dims) + relative_position_params(dims)
            + body_head_params(dims, task) + head_params(dims, task, num_labels))
