"""Architecture descriptions: one `Arch` per model family says where the blocks,
attention, projections, norms and heads of a transformers model live and which
structural facts (fused q/k/v, gated MLP, norm placement, positions, experts, ...)
the methods, the estimator, the prompt methods, merging and GGUF export need.

This is the only module that knows a family by its name: everything else asks the
description (`arch_of(model)`, `arch_for_model_type(model_type)`, `ModelDims.arch`).
Numbers that vary within a family (sizes, GQA heads, biases) are read from the
config by engine.dims. docs/adding-an-architecture.md walks through adding one."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class BlockLinear:
    """One linear layer of a block: its block-relative path, the sizes of its input and
    output by name ("hidden", "q" = heads·head_dim, "kv" = kv_heads·head_dim,
    "qkv" = q + 2·kv, "ffn" = intermediate, "ffn2" = 2·intermediate) and when it has
    a bias ("qkv": attention_bias or the family's q/k/v bias, "attention", "mlp",
    "always", "never")."""

    path: str
    n_in: str
    n_out: str
    bias: str


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts FFN: the experts are 3-D parameters (transformers 5.x fuses
    every expert's projections into one tensor per projection), chosen per token by a
    router."""

    path: str                      # block-relative module holding the expert tensors
    params: tuple[str, ...]        # its 3-D parameters, e.g. gate_up_proj (E, 2·I, H), down_proj (E, H, I)
    router: str                    # block-relative router module (a weight of E x H)
    num_key: str                   # config key of the number of experts
    intermediate_key: str          # config key of one expert's FFN width
    active_key: str = "num_experts_per_tok"
    # each of `params` per expert as (out, in) in ModelDims sizes ("hidden", "expert", "expert2" = 2·I):
    # stored (E, out, in) and used as F.linear(x, param[e]) (transformers' is_transposed False)
    param_sizes: tuple[tuple[str, str], ...] = (("expert2", "hidden"), ("hidden", "expert"))


@dataclass(frozen=True)
class Arch:
    """Where the parts of one model family are and how its blocks are built."""

    family: str                    # the description's name (reported, never compared outside this module)
    kind: str                      # "decoder" (causal LM) | "encoder" (classification)
    backbone: str                  # attribute of the task model holding the bare transformer
    blocks_path: str               # dotted path to the ModuleList of blocks
    embed_path: str                # input word embeddings
    head_names: tuple[str, ...]    # classifier / lm head module names (top level)
    q: str                         # block-relative projections (one path for all three when fused)
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]        # up/gate (llama), intermediate.dense (bert), gate_up_proj (fused)
    ffn_out: str                   # down_proj / output.dense
    attn_path: str                 # the attention module inside a block
    ffn_path: str                  # the module whose output is the FFN output
    linears: tuple[BlockLinear, ...] = ()   # every linear of a block, in module order
    # ---- norms
    norm: str = "rmsnorm"          # "rmsnorm" (weight only) | "layernorm"
    norm_bias: bool = False        # layernorm with a bias
    norm_placement: str = "pre"    # "pre" | "post" (BERT, OLMo 2: after the sublayer) | "sandwich" (Gemma 2/3)
    attn_norm: Optional[str] = None    # the attention sublayer's norm (Houlsby trains it)
    ffn_norm: Optional[str] = None     # the FFN sublayer's norm
    extra_norms: tuple[str, ...] = ()  # further per-block norms of hidden size (Gemma's post norms)
    qk_norm: str = "none"          # "none" | "head" (per head_dim: Qwen3, Gemma 3) | "width" (over the q and kv widths: OLMo 2)
    first_attn_norm_identity: bool = False   # ModernBERT: block 0 has no attention norm
    final_norm: Optional[str] = None   # model-level final norm
    embed_norm: Optional[str] = None   # embeddings' norm (BERT-style encoders)
    norm_types: tuple[str, ...] = ("LayerNorm", "LlamaRMSNorm", "RMSNorm")
    # ---- attention, positions, FFN
    fused_qkv: bool = False
    qkv_bias: bool = False         # q/k/v with a bias, o without (Qwen2: no config flag says so)
    positions: str = "rope"        # "rope" | "learned" | "relative" (DeBERTa)
    token_types: bool = False      # token-type embeddings
    embedding_projection: bool = False  # DeBERTa's embedding_size != hidden_size projection
    gated_ffn: bool = True
    fused_gate_up: bool = False
    activation: str = "silu"
    softmax_fp32: bool = True      # eager attention's softmax in fp32 (Llama-style)
    softmax_mask_dtype: bool = False   # eager attention's softmax runs in the dtype of the float mask it adds,
    #                                    the embeddings' (GPT-2: fp32 under autocast when they train)
    sdpa: bool = True              # transformers runs its attention through SDPA (Gemma 2's soft-capping: eager only)
    embedding_scale: bool = False  # Gemma: embeddings times sqrt(hidden)
    logit_softcap_key: Optional[str] = None   # config key of the final-logit soft-capping (tanh(x/c)·c)
    logits_divisor_key: Optional[str] = None  # config key logits are divided by (Granite's logits_scaling)
    conv1d: bool = False           # GPT-2's Conv1D (weights stored in x out)
    experts: Optional[Experts] = None
    # ---- heads
    pooler: Optional[str] = None   # pooler linear kept by the classification model
    pooler_bias: bool = True
    pooler_norm: bool = False     # a norm after the pooler (ModernBERT's head)
    classifier: tuple[str, ...] = ("score",)   # classification head linears, hidden->...->labels
    classifier_bias: bool = False
    mlm_head: bool = False         # masked-LM transform (dense + norm + decoder bias) when not classifying
    # ---- what methods can do with it
    default_lora_targets: tuple[str, ...] = field(default=())
    ia3_targets: tuple[str, ...] = ()
    ia3_feedforward: tuple[str, ...] = ()
    soft_prompt: bool = True       # virtual input tokens (prompt / p-tuning) match peft: the head reads the backbone's output
    kv_prefix: bool = False        # the attention takes a key/value cache (prefix tuning)
    prefix_attn_path: Optional[str] = None   # the attention module prefix slot masks hook
    adaption_prompt: bool = False  # LLaMA-Adapter's gated prompt attention fits (separate q/k/v, RoPE)
    bottleneck_adapters: bool = True   # serial bottleneck adapters (Houlsby, Compacter, ...) are verified on it
    parallel_sites: Optional[tuple[str, str]] = None   # (attention, FFN) modules a parallel adapter wraps
    parallel_into_residual: bool = False   # BERT-style output modules taking (hidden, input_tensor)
    saved_walk: str = "decoder"    # the estimator's block walk: "decoder" (pre-norm) | "encoder" (post-norm)
    # ---- config keys the activation walk reads (what autograd saves depends on them)
    embed_dropout_key: str = "hidden_dropout_prob"   # the embeddings' dropout (ModernBERT: embedding_dropout)
    classifier_dropout_keys: tuple[str, ...] = ("classifier_dropout", "hidden_dropout_prob")  # first set one
    pooling_key: Optional[str] = None   # config key choosing the head's pooling: "cls" (token 0) or "mean"
    #                                     (ModernBERT's classifier_pooling); None: token 0
    out_dropout_keys: tuple[str, str] = ("", "")   # pre-norm walk: dropout on the attention output and on the
    #                                                FFN activation (ModernBERT: attention_dropout, mlp_dropout)
    attn_dropout_key: str = "attention_dropout"   # pre-norm walk: dropout on the attention probabilities (GPT-2: attn_pdrop)
    ffn_out_dropout_key: str = ""   # pre-norm walk: dropout on the FFN's output, after its down projection
    #                                 (GPT-2: resid_pdrop)
    local_attention_key: Optional[str] = None   # the full width of a local-attention window (ModernBERT:
    #                                             local_attention; a sliding layer sees half of it either side)
    rope_tables_saved: bool = False   # the unfused rotary embedding keeps its cos and sin tables for backward,
    #                                   one pair per layer type (ModernBERT: local and global layers differ)
    global_every: Optional[tuple[str, int]] = None   # (config key, its default): every n-th layer attends
    #                                                  globally, the others locally (when the config has no layer_types)
    gguf_arch: Optional[str] = None   # llama.cpp architecture engine.gguf_export writes it as (None: refused)
    gguf_rope: str = "neox"        # llama.cpp's RoPE for it: "neox" (rotate halves, as HF) | "normal" (adjacent pairs)
    gguf_rules: tuple[str, ...] = ()   # engine.gguf_archs.RULES: the further keys / checks its llama.cpp arch needs
    norm_plus_one: bool = False    # RMSNorm computes x·(1+w) (Gemma)
    config_class: str = ""         # transformers config class (tiny random models)
    tiny: tuple[tuple[str, object], ...] = ()   # extra kwargs of a tiny random config

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

    @property
    def is_encoder(self) -> bool:
        return self.kind == "encoder"

    @cached_property
    def key(self) -> str:
        """The whole description as a string, made once (caches key on it)."""
        return repr(self)

    @property
    def generates(self) -> bool:
        """A causal LM that can continue text (served on /v1); encoders cannot."""
        return self.is_decoder

    def sublayer_norms(self, placement: str = "both") -> list[str]:
        """The norms of a block around the attention / FFN sublayers (those Houlsby trains)."""
        attn, ffn = self.attn_norm, self.ffn_norm
        if attn is None or ffn is None:
            raise ValueError(f"no sublayer norm names for the {self.family} architecture")
        return {"attn": [attn], "ffn": [ffn], "both": [attn, ffn]}[placement]

    def block_norms(self) -> list[str]:
        """Every hidden-size norm of a block."""
        return [n for n in (self.attn_norm, self.ffn_norm) if n] + list(self.extra_norms)


def _llama_linears() -> tuple[BlockLinear, ...]:
    return (BlockLinear("self_attn.q_proj", "hidden", "q", "qkv"),
            BlockLinear("self_attn.k_proj", "hidden", "kv", "qkv"),
            BlockLinear("self_attn.v_proj", "hidden", "kv", "qkv"),
            BlockLinear("self_attn.o_proj", "q", "hidden", "attention"),
            BlockLinear("mlp.gate_proj", "hidden", "ffn", "mlp"),
            BlockLinear("mlp.up_proj", "hidden", "ffn", "mlp"),
            BlockLinear("mlp.down_proj", "ffn", "hidden", "mlp"))


_DECODER_TINY = (("num_key_value_heads", 2), ("head_dim", 8), ("max_position_embeddings", 512),
                 ("tie_word_embeddings", True), ("pad_token_id", 0), ("bos_token_id", 101), ("eos_token_id", 102))

LLAMA = Arch(
    family="llama", kind="decoder", backbone="model",
    blocks_path="model.layers",
    embed_path="model.embed_tokens",
    head_names=("lm_head", "score"),
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
    attn_path="self_attn", ffn_path="mlp", linears=_llama_linears(),
    attn_norm="input_layernorm", ffn_norm="post_attention_layernorm", final_norm="model.norm",
    default_lora_targets=("q_proj", "v_proj"),
    ia3_targets=("k_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",),
    kv_prefix=True, prefix_attn_path="self_attn", adaption_prompt=True,
    parallel_sites=("self_attn", "mlp"), gguf_arch="llama", gguf_rope="normal",
    config_class="LlamaConfig",
    tiny=(("num_key_value_heads", 2), ("max_position_embeddings", 512), ("tie_word_embeddings", True),
          ("pad_token_id", 0), ("bos_token_id", 101), ("eos_token_id", 102)),
)
MISTRAL = replace(LLAMA, family="mistral", config_class="MistralConfig", tiny=_DECODER_TINY)
QWEN2 = replace(LLAMA, family="qwen2", qkv_bias=True, gguf_arch="qwen2", gguf_rope="neox", config_class="Qwen2Config",
                tiny=_DECODER_TINY)
# Qwen3: q/k RMSNorm per head before RoPE
QWEN3 = replace(LLAMA, family="qwen3", qk_norm="head", adaption_prompt=False, gguf_arch="qwen3", gguf_rope="neox",
                config_class="Qwen3Config", tiny=_DECODER_TINY)
# SmolLM3: NoPE layers (no_rope_layers)
SMOLLM3 = replace(LLAMA, family="smollm3", gguf_arch="smollm3", gguf_rules=("nope_every_4th",), adaption_prompt=False,
                  config_class="SmolLM3Config", tiny=_DECODER_TINY)
# Granite: Llama blocks with embedding / residual / attention / logit multipliers from the config
GRANITE = replace(LLAMA, family="granite", gguf_arch="granite", gguf_rules=("multipliers",), adaption_prompt=False,
                  logits_divisor_key="logits_scaling", config_class="GraniteConfig", tiny=_DECODER_TINY)
# OLMo 2: norms after the attention and FFN outputs (before the residual add), q/k norm over all heads
OLMO2 = replace(LLAMA, family="olmo2", norm_placement="post", attn_norm="post_attention_layernorm",
                ffn_norm="post_feedforward_layernorm", qk_norm="width", adaption_prompt=False,
                gguf_arch="olmo2", gguf_rope="neox", gguf_rules=("square_attention", "output_required"),
                config_class="Olmo2Config", tiny=_DECODER_TINY)
# Gemma 2: pre and post norms around both sublayers, GELU-tanh gated MLP, scaled embeddings,
# attention and final-logit soft-capping
GEMMA2 = replace(LLAMA, family="gemma2", norm_placement="sandwich", ffn_norm="pre_feedforward_layernorm",
                 extra_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                 activation="gelu_pytorch_tanh", embedding_scale=True, logit_softcap_key="final_logit_softcapping",
                 sdpa=False, adaption_prompt=False, gguf_arch="gemma2", gguf_rope="neox",
                 norm_plus_one=True, gguf_rules=("swa_every_2nd", "softcap_always", "tied_output"),
                 config_class="Gemma2Config", tiny=_DECODER_TINY)
GEMMA3 = replace(GEMMA2, family="gemma3_text", gguf_arch="gemma3",
                 gguf_rules=("swa_5_of_6", "no_softcap", "swa_rope_10000"), qk_norm="head",
                 logit_softcap_key="final_logit_softcapping", sdpa=True, config_class="Gemma3TextConfig")
# Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj
PHI3 = replace(
    LLAMA, family="phi3", q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj",
    ffn_in=("mlp.gate_up_proj",), fused_qkv=True, fused_gate_up=True,
    linears=(BlockLinear("self_attn.o_proj", "q", "hidden", "never"),
             BlockLinear("self_attn.qkv_proj", "hidden", "qkv", "never"),
             BlockLinear("mlp.gate_up_proj", "hidden", "ffn2", "never"),
             BlockLinear("mlp.down_proj", "ffn", "hidden", "never")),
    default_lora_targets=("qkv_proj",), ia3_targets=("qkv_proj", "down_proj"),
    adaption_prompt=False, gguf_arch="phi3", gguf_rope="neox", gguf_rules=("square_attention", "sliding_window"),
    config_class="Phi3Config", tiny=_DECODER_TINY)
# Mixture of experts: attention as Llama's, the FFN a router and fused 3-D expert tensors
_MOE_LINEARS = _llama_linears()[:4]
MIXTRAL = replace(
    LLAMA, family="mixtral", ffn_in=(), ffn_out="", linears=_MOE_LINEARS,
    experts=Experts(path="mlp.experts", params=("gate_up_proj", "down_proj"), router="mlp.gate",
                    num_key="num_local_experts", intermediate_key="intermediate_size"),
    ia3_targets=("k_proj", "v_proj"), ia3_feedforward=(), adaption_prompt=False, parallel_sites=None,
    gguf_arch="llama", gguf_rules=("experts",), config_class="MixtralConfig",
    tiny=_DECODER_TINY + (("num_local_experts", 4), ("num_experts_per_tok", 2)))
QWEN3_MOE = replace(
    MIXTRAL, family="qwen3_moe", qk_norm="head",
    experts=Experts(path="mlp.experts", params=("gate_up_proj", "down_proj"), router="mlp.gate",
                    num_key="num_experts", intermediate_key="moe_intermediate_size"),
    gguf_arch="qwen3moe", gguf_rope="neox", gguf_rules=("experts", "topk_renormalised"),
    config_class="Qwen3MoeConfig",
    tiny=_DECODER_TINY + (("num_experts", 4), ("num_experts_per_tok", 2), ("moe_intermediate_size", 16)))

_BERT_LINEARS = (BlockLinear("attention.self.query", "hidden", "hidden", "always"),
                 BlockLinear("attention.self.key", "hidden", "hidden", "always"),
                 BlockLinear("attention.self.value", "hidden", "hidden", "always"),
                 BlockLinear("attention.output.dense", "hidden", "hidden", "always"),
                 BlockLinear("intermediate.dense", "hidden", "ffn", "always"),
                 BlockLinear("output.dense", "ffn", "hidden", "always"))

BERT = Arch(
    family="bert", kind="encoder", backbone="bert",
    blocks_path="bert.encoder.layer",
    embed_path="bert.embeddings.word_embeddings",
    head_names=("classifier", "cls"),
    q="attention.self.query", k="attention.self.key", v="attention.self.value",
    o="attention.output.dense",
    ffn_in=("intermediate.dense",), ffn_out="output.dense",
    attn_path="attention", ffn_path="output", linears=_BERT_LINEARS,
    norm="layernorm", norm_bias=True, norm_placement="post",
    attn_norm="attention.output.LayerNorm", ffn_norm="output.LayerNorm",
    embed_norm="bert.embeddings.LayerNorm", positions="learned", token_types=True,
    gated_ffn=False, activation="gelu", softmax_fp32=False,
    pooler="bert.pooler.dense", classifier=("classifier",), classifier_bias=True, mlm_head=True,
    default_lora_targets=("query", "value"),
    ia3_targets=("key", "value", "output.dense"), ia3_feedforward=("output.dense",),
    kv_prefix=True, prefix_attn_path="attention.self",
    parallel_sites=("attention.output", "output"), parallel_into_residual=True,
    saved_walk="encoder", config_class="BertConfig", tiny=(("max_position_embeddings", 512), ("pad_token_id", 0)),
)
# RoBERTa: BERT blocks; a classification head of dense + out_proj and no pooler
ROBERTA = replace(
    BERT, family="roberta", backbone="roberta", blocks_path="roberta.encoder.layer",
    embed_path="roberta.embeddings.word_embeddings", embed_norm="roberta.embeddings.LayerNorm",
    pooler=None, classifier=("classifier.dense", "classifier.out_proj"), soft_prompt=False,
    config_class="RobertaConfig",
    tiny=(("max_position_embeddings", 514), ("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2),
          ("type_vocab_size", 1)))
# DeBERTa-v2/v3: disentangled relative attention (no key/value cache, eager only), query_proj / key_proj /
# value_proj
DEBERTA_V2 = replace(
    BERT, family="deberta_v2", backbone="deberta", blocks_path="deberta.encoder.layer",
    embed_path="deberta.embeddings.word_embeddings", embed_norm="deberta.embeddings.LayerNorm",
    q="attention.self.query_proj", k="attention.self.key_proj", v="attention.self.value_proj",
    linears=(BlockLinear("attention.self.query_proj", "hidden", "hidden", "always"),
             BlockLinear("attention.self.key_proj", "hidden", "hidden", "always"),
             BlockLinear("attention.self.value_proj", "hidden", "hidden", "always"),) + _BERT_LINEARS[3:],
    positions="relative", embedding_projection=True, soft_prompt=False,
    pooler="pooler.dense", mlm_head=False,
    default_lora_targets=("query_proj", "value_proj"),
    ia3_targets=("key_proj", "value_proj", "output.dense"),
    kv_prefix=False, prefix_attn_path=None, sdpa=False, classifier_dropout_keys=("cls_dropout", "hidden_dropout_prob"),
    config_class="DebertaV2Config",
    tiny=(("max_position_embeddings", 512), ("pad_token_id", 0), ("relative_attention", True),
          ("position_buckets", 16), ("pos_att_type", ["p2c", "c2p"]), ("type_vocab_size", 0)))
# ModernBERT: pre-norm encoder (the decoder walk), fused Wqkv and gated Wi (GELU), RoPE, bias-free LayerNorms,
# local (sliding-window) attention in all but every n-th layer
MODERNBERT = replace(
    BERT, family="modernbert", backbone="model", blocks_path="model.layers",
    embed_path="model.embeddings.tok_embeddings", embed_norm="model.embeddings.norm",
    q="attn.Wqkv", k="attn.Wqkv", v="attn.Wqkv", o="attn.Wo", ffn_in=("mlp.Wi",), ffn_out="mlp.Wo",
    attn_path="attn", ffn_path="mlp", fused_qkv=True, fused_gate_up=True, gated_ffn=True,
    linears=(BlockLinear("attn.Wqkv", "hidden", "qkv", "attention"),
             BlockLinear("attn.Wo", "hidden", "hidden", "attention"),
             BlockLinear("mlp.Wi", "hidden", "ffn2", "mlp"),
             BlockLinear("mlp.Wo", "ffn", "hidden", "mlp")),
    norm_bias=False, norm_placement="pre", attn_norm="attn_norm", ffn_norm="mlp_norm",
    first_attn_norm_identity=True, final_norm="model.final_norm", positions="rope", token_types=False,
    soft_prompt=False,
    pooler="head.dense", pooler_bias=False, pooler_norm=True, mlm_head=False,
    default_lora_targets=("Wqkv",), ia3_targets=("Wqkv", "mlp.Wo"), ia3_feedforward=("mlp.Wo",),
    kv_prefix=False, prefix_attn_path=None, parallel_sites=None, parallel_into_residual=False,
    softmax_fp32=True, saved_walk="decoder", embed_dropout_key="embedding_dropout",
    classifier_dropout_keys=("classifier_dropout",), out_dropout_keys=("attention_dropout", "mlp_dropout"),
    pooling_key="classifier_pooling",
    local_attention_key="local_attention", rope_tables_saved=True,
    global_every=("global_attn_every_n_layers", 3), config_class="ModernBertConfig",
    tiny=(("max_position_embeddings", 512), ("pad_token_id", 0), ("bos_token_id", 101), ("eos_token_id", 102),
          ("cls_token_id", 101), ("sep_token_id", 102), ("global_attn_every_n_layers", 2),
          ("local_attention", 16)))

GPT2 = Arch(
    family="gpt2", kind="decoder", backbone="transformer",
    blocks_path="transformer.h",
    embed_path="transformer.wte",
    head_names=("lm_head", "score"),
    q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj",
    ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj",
    attn_path="attn", ffn_path="mlp",
    linears=(BlockLinear("attn.c_attn", "hidden", "qkv", "always"),
             BlockLinear("attn.c_proj", "hidden", "hidden", "always"),
             BlockLinear("mlp.c_fc", "hidden", "ffn", "always"),
             BlockLinear("mlp.c_proj", "ffn", "hidden", "always")),
    norm="layernorm", norm_bias=True, attn_norm="ln_1", ffn_norm="ln_2", final_norm="transformer.ln_f",
    fused_qkv=True, positions="learned", gated_ffn=False, activation="gelu_new", softmax_fp32=False,
    softmax_mask_dtype=True, conv1d=True,
    default_lora_targets=("c_attn",),
    ia3_targets=("c_attn", "mlp.c_proj"), ia3_feedforward=("mlp.c_proj",),
    bottleneck_adapters=True,
    # pre-norm blocks (the decoder walk) with dropout on the embeddings, the attention probabilities, the
    # attention output and the FFN output
    embed_dropout_key="embd_pdrop", attn_dropout_key="attn_pdrop", out_dropout_keys=("resid_pdrop", ""),
    ffn_out_dropout_key="resid_pdrop",
    gguf_arch="gpt2", config_class="GPT2Config",
    # GPT2Config keeps the FFN width as n_inner (None: 4·hidden): set it to the battery's 64
    tiny=(("n_inner", 64), ("n_positions", 512), ("tie_word_embeddings", True), ("pad_token_id", 0),
          ("bos_token_id", 101), ("eos_token_id", 102)),
)

ARCHS: tuple[Arch, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, SMOLLM3, GRANITE, OLMO2, GEMMA2, GEMMA3, PHI3,
                           MIXTRAL, QWEN3_MOE, BERT, ROBERTA, DEBERTA_V2, MODERNBERT, GPT2)

# config.json's model_type -> description (transformers spells DeBERTa-v2 with a hyphen)
_BY_MODEL_TYPE = {a.family: a for a in ARCHS}
_BY_MODEL_TYPE["deberta-v2"] = DEBERTA_V2
del _BY_MODEL_TYPE["deberta_v2"]


class UnsupportedArchitecture(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def arch_for_model_type(model_type: str) -> Arch:
    """The description of a config's model_type (or of a family name)."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        for a in ARCHS:
            if a.family == model_type:
                return a
        raise UnsupportedArchitecture(
            f"model type {model_type!r} is not supported; supported: {supported_model_types()}"
        ) from None


def model_type_of(arch: Arch) -> str:
    """The config model_type a description is registered under."""
    return next(mt for mt, a in _BY_MODEL_TYPE.items() if a is arch)


def gguf_families() -> list[str]:
    """The families engine.gguf_export writes, in ARCHS order."""
    return [a.family for a in ARCHS if a.gguf_arch]


def gguf_writable(model_type: Optional[str]) -> bool:
    """Whether engine.gguf_export can write a model of this model_type (or family)."""
    try:
        return arch_for_model_type(model_type or "").gguf_arch is not None
    except UnsupportedArchitecture:
        return False


def arch_of(model: nn.Module) -> Arch:
    return arch_for_model_type(model.config.model_type)


def logit_transform(model: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What the family's causal-LM forward does to lm_head's output (Granite divides by
    logits_scaling, Gemma 2 soft-caps), for a loss that calls the head itself; None when
    the logits are the head's output."""
    try:
        arch = arch_of(model)
    except UnsupportedArchitecture:
        return None
    cfg = model.config
    cap = getattr(cfg, arch.logit_softcap_key, None) if arch.logit_softcap_key else None
    div = getattr(cfg, arch.logits_divisor_key, None) if arch.logits_divisor_key else None
    div = None if div in (None, 1, 1.0) else float(div)
    if not cap and div is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if div is not None:
            logits = logits / div
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return transform


class TransformedHead(nn.Module):
    """An LM head followed by the family's logit transform."""

    def __init__(self, head: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.head, self.transform = head, transform

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(h))


def output_head(model: nn.Module) -> nn.Module:
    """The LM head as anything that calls it directly (the chunked loss, decoding, serving,
    the harness) must use it: the output embeddings, followed by the family's logit
    transform when it has one (Granite's scaling, Gemma 2's soft-capping)."""
    head = model.get_output_embeddings()
    transform = logit_transform(model)
    return head if transform is None else TransformedHead(head, transform)


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
