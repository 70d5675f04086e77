"""Exact parameter counts from a model config: what the transformers model for a
task would hold, and what a method trains (asked of the method's spec)."""

from __future__ import annotations

from typing import Optional

from ..dims import ModelDims
from .catalog import default_task, model_dims


def linear_params(in_f: int, out_f: int, bias: bool) -> int:
    return in_f * out_f + (out_f if bias else 0)


def norm_params(dims: ModelDims) -> int:
    return dims.hidden_size * (2 if dims.norm == "layernorm" else 1)


def block_params(dims: ModelDims) -> int:
    """Parameters of one transformer block (linears and its two norms)."""
    lin = sum(linear_params(s.in_features, s.out_features, s.bias) for s in dims.block_linears())
    return lin + 2 * norm_params(dims)


def block_linear_weights(dims: ModelDims) -> int:
    """Weights (no biases) of one block's linears: what NF4 quantizes in a block."""
    return sum(s.in_features * s.out_features for s in dims.block_linears())


def frozen_linear_params(dims: ModelDims) -> int:
    """Weights of every block linear: what NF4 quantizes (embeddings, norms, heads stay in 16/32 bit)."""
    return dims.num_layers * block_linear_weights(dims)


def is_roberta(cfg: dict) -> bool:
    return cfg.get("model_type") == "roberta"


def is_deberta(cfg: dict) -> bool:
    return cfg.get("model_type") in ("deberta-v2", "deberta")


def embedding_params(cfg: dict, dims: ModelDims) -> int:
    h = dims.hidden_size
    n = dims.vocab_size * h
    if dims.family == "gpt2":
        return n + dims.max_position_embeddings * h
    if dims.family == "bert":
        if not is_deberta(cfg) or cfg.get("position_biased_input", True):
            n += dims.max_position_embeddings * h
        n += dims.type_vocab_size * h
        n += 2 * h                                            # embeddings.LayerNorm
        emb = cfg.get("embedding_size", h)
        if is_deberta(cfg) and emb != h:
            n += emb * h - dims.vocab_size * h + dims.vocab_size * emb   # smaller embeddings + projection
    return n


def encoder_extra_params(cfg: dict, dims: ModelDims) -> int:
    """DeBERTa's relative position embeddings and their norm."""
    if not (is_deberta(cfg) and cfg.get("relative_attention", False)):
        return 0
    buckets = cfg.get("position_buckets", -1)
    max_rel = cfg.get("max_relative_positions", -1)
    if max_rel < 1:
        max_rel = dims.max_position_embeddings
    span = buckets if buckets > 0 else max_rel
    n = 2 * span * dims.hidden_size
    if "layer_norm" in str(cfg.get("norm_rel_ebd", "none")):
        n += 2 * dims.hidden_size
    if not cfg.get("share_att_key", False):
        n += dims.num_layers * 2 * linear_params(dims.hidden_size, dims.hidden_size, True)
    return n


def head_params(cfg: dict, dims: ModelDims, task: str, num_labels: int) -> int:
    """The task head that a prepared run trains (classifier / score); 0 for causal LM."""
    if task != "classification":
        return 0
    h = dims.hidden_size
    if dims.family == "bert":
        if is_roberta(cfg):      # RobertaClassificationHead: dense + out_proj
            return linear_params(h, h, True) + linear_params(h, num_labels, True)
        return linear_params(h, num_labels, True)
    return linear_params(h, num_labels, False)                 # score


def body_head_params(cfg: dict, dims: ModelDims, task: str) -> int:
    """Everything after the blocks except the trainable task head: final norm,
    pooler, LM head (when not tied)."""
    h = dims.hidden_size
    if dims.family == "bert":
        if task == "classification":
            if is_roberta(cfg):
                return 0
            if is_deberta(cfg):
                return linear_params(cfg.get("pooler_hidden_size", h), cfg.get("pooler_hidden_size", h), True)
            return linear_params(h, h, True)                   # BertForSequenceClassification keeps the pooler
        # masked / causal LM head: transform dense + LayerNorm + decoder bias (decoder weight tied)
        return linear_params(h, h, True) + 2 * h + dims.vocab_size
    n = norm_params(dims)                                      # final norm
    if task == "causal_lm" and not dims.tie_word_embeddings:
        n += dims.vocab_size * h
    return n


def count_total_params(cfg: dict, task: Optional[str] = None, num_labels: int = 2) -> int:
    """Exact parameter count of the transformers model for `task`
    (AutoModelForSequenceClassification / AutoModelForCausalLM), tied weights once."""
    dims = model_dims(cfg)
    task = task or default_task(dims)
    return (embedding_params(cfg, dims) + dims.num_layers * block_params(dims) + encoder_extra_params(cfg, dims)
            + body_head_params(cfg, dims, task) + head_params(cfg, dims, task, num_labels))


def count_trainable(spec, method_cfg, dims: ModelDims, cfg: dict, task: str, num_labels: int) -> int:
    """spec.count_trainable(dims, cfg, task), plus the classification head when the
    method leaves it trainable. Raises NotImplementedError for a method without
    an exact count (never a guess)."""
    if spec.count_trainable is None:
        raise NotImplementedError(
            f"method {spec.name!r} has no count_trainable yet, so the estimator cannot give an exact "
            f"trainable-parameter count for it (engine/methods must implement MethodSpec.count_trainable)")
    n = int(spec.count_trainable(dims, method_cfg, task))
    if task == "classification" and spec.trains_head:
        n += head_params(cfg, dims, task, num_labels)
    return n


def added_params(spec, n_tr: int, head: int) -> int:
    """Parameters a method adds to the model (adapters, prompts, LoRA matrices):
    its trainable count minus the (existing) classification head; 0 for methods
    that train parameters the model already has."""
    return max(0, n_tr - head) if spec.adds_params else 0
