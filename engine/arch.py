"""Architecture descriptions: where the blocks, attention and FFN projections of
a supported transformer live, so that methods can target them by role instead
of by model-specific names."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Arch:
    """Names of the parts of one model family, relative to a block."""

    family: str                    # "llama" | "bert" | "gpt2"
    blocks_path: str               # dotted path to the ModuleList of blocks
    embed_path: str                # input word embeddings
    head_names: tuple[str, ...]    # classifier / lm head module names (top level)
    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]        # up/gate (llama) or intermediate.dense (bert)
    ffn_out: str                   # down_proj / output.dense
    attn_path: str                 # the attention module inside a block
    ffn_path: str                  # the module whose output is the FFN output
    norm_types: tuple[str, ...] = ("LayerNorm", "LlamaRMSNorm", "RMSNorm")
    default_lora_targets: tuple[str, ...] = field(default=())
    generates: bool = True         # a causal LM that can continue text (served on /v1); BERT: no


LLAMA = Arch(
    family="llama",
    blocks_path="model.layers",
    embed_path="model.embed_tokens",
    head_names=("lm_head", "score"),
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
    attn_path="self_attn", ffn_path="mlp",
    default_lora_targets=("q_proj", "v_proj"),
)

BERT = Arch(
    family="bert",
    blocks_path="bert.encoder.layer",
    embed_path="bert.embeddings.word_embeddings",
    head_names=("classifier", "cls"),
    q="attention.self.query", k="attention.self.key", v="attention.self.value",
    o="attention.output.dense",
    ffn_in=("intermediate.dense",), ffn_out="output.dense",
    attn_path="attention", ffn_path="output",
    default_lora_targets=("query", "value"),
    generates=False,
)

GPT2 = Arch(
    family="gpt2",
    blocks_path="transformer.h",
    embed_path="transformer.wte",
    head_names=("lm_head", "score"),
    q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj",
    ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj",
    attn_path="attn", ffn_path="mlp",
    default_lora_targets=("c_attn",),
)

_BY_MODEL_TYPE = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA,
    "bert": BERT,
    "gpt2": GPT2,
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_for_model_type(model_type: str) -> Arch:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"model type {model_type!r} is not supported; supported: {sorted(_BY_MODEL_TYPE)}"
        ) from None


def arch_of(model: nn.Module) -> Arch:
    return arch_for_model_type(model.config.model_type)


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The classification head(s) of a sequence-classification model (not the LM heads)."""
    names = [n for n in arch_of(model).head_names if hasattr(model, n)]
    return [(n, getattr(model, n)) for n in names if n not in ("lm_head", "cls")]


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks in order, first to last."""
    return model.get_submodule(arch_of(model).blocks_path)


def set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
