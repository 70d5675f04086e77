"""Model dimensions read from a Hugging Face config (a dict from config.json): the
numbers the estimator and the methods' exact parameter counts need, without
instantiating a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .arch import Arch, arch_for_model_type


@dataclass(frozen=True)
class LinearShape:
    """One linear layer inside a block: its short and block-relative names, shape and bias."""

    short: str        # "q_proj", "query", "c_attn"
    path: str         # block-relative: "self_attn.q_proj", "attention.self.query"
    in_features: int
    out_features: int
    bias: bool
    conv1d: bool = False   # GPT-2 Conv1D (weight stored in x out)


@dataclass(frozen=True)
class ModelDims:
    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_ffn: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    type_vocab_size: int = 0       # BERT token types
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool = False         # q/k/v with a bias, o without (Qwen2, whose config has no flag for it)
    norm: str = "rmsnorm"          # "rmsnorm" (weight only) | "layernorm" (weight + bias)
    arch: Optional[Arch] = None
    num_labels: int = 2            # classification head width

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self) -> list[LinearShape]:
        """Every linear layer of one block, in module order."""
        h, i = self.hidden_size, self.intermediate_size
        if self.family == "llama":
            q_out = self.num_heads * self.head_dim
            ab, mb = self.attention_bias, self.mlp_bias
            qkv = ab or self.qkv_bias
            return [
                LinearShape("q_proj", "self_attn.q_proj", h, q_out, qkv),
                LinearShape("k_proj", "self_attn.k_proj", h, self.kv_dim, qkv),
                LinearShape("v_proj", "self_attn.v_proj", h, self.kv_dim, qkv),
                LinearShape("o_proj", "self_attn.o_proj", q_out, h, ab),
                LinearShape("gate_proj", "mlp.gate_proj", h, i, mb),
                LinearShape("up_proj", "mlp.up_proj", h, i, mb),
                LinearShape("down_proj", "mlp.down_proj", i, h, mb),
            ]
        if self.family == "bert":
            return [
                LinearShape("query", "attention.self.query", h, h, True),
                LinearShape("key", "attention.self.key", h, h, True),
                LinearShape("value", "attention.self.value", h, h, True),
                LinearShape("dense", "attention.output.dense", h, h, True),
                LinearShape("dense", "intermediate.dense", h, i, True),
                LinearShape("dense", "output.dense", i, h, True),
            ]
        if self.family == "gpt2":
            return [
                LinearShape("c_attn", "attn.c_attn", h, 3 * h, True, True),
                LinearShape("c_proj", "attn.c_proj", h, h, True, True),
                LinearShape("c_fc", "mlp.c_fc", h, i, True, True),
                LinearShape("c_proj", "mlp.c_proj", i, h, True, True),
            ]
        raise ValueError(f"unknown family {self.family}")


def dims_from_config(cfg: dict) -> ModelDims:
    """ModelDims from a config.json dict (llama/mistral/qwen2, bert/roberta/deberta-like, gpt2)."""
    mt = cfg.get("model_type", "")
    arch = arch_for_model_type(mt if mt not in ("roberta", "deberta-v2", "deberta") else "bert")
    if arch.family == "gpt2":
        h = cfg.get("n_embd", cfg.get("hidden_size"))
        heads = cfg.get("n_head", cfg.get("num_attention_heads"))
        return ModelDims(
            family="gpt2", model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=h,
            num_layers=cfg.get("n_layer", cfg.get("num_hidden_layers")), num_heads=heads, num_kv_heads=heads,
            head_dim=h // heads, intermediate_size=cfg.get("n_inner") or 4 * h, gated_ffn=False,
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            max_position_embeddings=cfg.get("n_positions", 1024), norm="layernorm", arch=arch)
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    if arch.family == "llama":
        return ModelDims(
            family="llama", model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=h,
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or h // heads, intermediate_size=cfg["intermediate_size"], gated_ffn=True,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            attention_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
            qkv_bias=mt == "qwen2", norm="rmsnorm", arch=arch)
    return ModelDims(
        family="bert", model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=h,
        num_layers=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
        intermediate_size=cfg["intermediate_size"], gated_ffn=False, tie_word_embeddings=True,
        max_position_embeddings=cfg.get("max_position_embeddings", 512),
        type_vocab_size=cfg.get("type_vocab_size", 2), attention_bias=True, mlp_bias=True, norm="layernorm",
        arch=arch)


def dims_of_model(model) -> ModelDims:
    return dims_from_config(model.config.to_dict())
