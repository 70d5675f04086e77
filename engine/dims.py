"""Model dimensions read from a Hugging Face config (a dict from config.json): the
numbers the estimator and the methods' exact parameter counts need, without
instantiating a model. Where the parts are comes from the family's `Arch`
(engine.arch); the sizes, GQA heads, biases and experts from the config."""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    num_experts: int = 0           # mixture of experts: experts per block (0: a dense FFN)
    experts_per_token: int = 0     # active experts per token
    expert_intermediate_size: int = 0
    embedding_size: int = 0        # DeBERTa: word embeddings narrower than hidden (0: hidden)
    position_biased_input: bool = True   # DeBERTa: absolute positions added to the input
    relative_params: int = 0       # DeBERTa: relative position embeddings, their norm and projections
    pooler_hidden_size: int = 0    # DeBERTa's pooler width (0: hidden)
    relative_linears: tuple = ()   # DeBERTa: per-block position projections (unshared keys), after value_proj
    relative_norm: bool = False    # DeBERTa: a LayerNorm on the relative position embeddings
    logit_transform: bool = False  # the causal-LM logits are soft-capped or scaled (Gemma 2, Granite)
    relative_span: int = 0         # DeBERTa: relative attention's span (position buckets or max relative
    #                                positions); each block reads 2·span relative embeddings (0: no relative attention)
    relative_kinds: tuple = ()     # DeBERTa: the disentangled terms, "c2p" and/or "p2c"
    relative_shared: bool = False  # DeBERTa: the positions go through query_proj / key_proj (share_att_key)
    sliding_layers: tuple = ()     # indices of the blocks with local (sliding-window) attention (ModernBERT)
    sliding_window: int = 0        # half a local window: SDPA gets a mask once the sequence reaches it

    @property
    def key(self) -> tuple:
        """A hashable key of this description for memos (engine.methods.targeting): the
        architecture's cached key and the sizes' repr, made once per instance."""
        k = self.__dict__.get("_key")
        if k is None:
            k = (self.arch.key if self.arch is not None else None, repr(replace(self, arch=None)))
            object.__setattr__(self, "_key", k)
        return k

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _size(self, name: str) -> int:
        q = self.num_heads * self.head_dim
        return {"hidden": self.hidden_size, "q": q, "kv": self.kv_dim, "qkv": q + 2 * self.kv_dim,
                "ffn": self.intermediate_size, "ffn2": 2 * self.intermediate_size}[name]

    def _bias(self, kind: str) -> bool:
        return {"qkv": self.attention_bias or self.qkv_bias, "attention": self.attention_bias,
                "mlp": self.mlp_bias, "always": True, "never": False}[kind]

    def block_linears(self) -> list[LinearShape]:
        """Every linear layer of one block, in module order (the experts of a
        mixture-of-experts block are 3-D tensors, not linears: see expert_params)."""
        held = self.__dict__.get("_block_linears")      # made once per instance: estimates ask often
        if held is None:
            held = tuple(self._make_block_linears())
            object.__setattr__(self, "_block_linears", held)
        return list(held)

    def _make_block_linears(self) -> list[LinearShape]:
        out = [LinearShape(bl.path.rsplit(".", 1)[-1], bl.path, self._size(bl.n_in), self._size(bl.n_out),
                           self._bias(bl.bias), self.arch.conv1d)
               for bl in self.arch.linears]
        if self.relative_linears:
            h = self.hidden_size
            out[3:3] = [LinearShape(p.rsplit(".", 1)[-1], p, h, h, True) for p in self.relative_linears]
        return out

    def norm_params(self) -> int:
        """Parameters of one hidden-size norm."""
        return self.hidden_size * (2 if self.norm == "layernorm" and self.arch.norm_bias else 1)

    def qk_norm_params(self) -> int:
        """Parameters of one block's q/k norms (Qwen3, Gemma 3: per head; OLMo 2: full width)."""
        kind = self.arch.qk_norm
        if kind == "head":
            return 2 * self.head_dim
        if kind == "width":
            return self.num_heads * self.head_dim + self.kv_dim
        return 0

    def block_norm_params(self, layer: int = 1) -> int:
        """Parameters of one block's norms (ModernBERT's first block has no attention norm)."""
        n = len(self.arch.block_norms())
        if self.arch.first_attn_norm_identity and layer == 0:
            n -= 1
        return n * self.norm_params() + self.qk_norm_params()

    def expert_tensors(self) -> list[tuple[str, int, int]]:
        """(block-relative parameter path, out, in) of each 3-D expert tensor of a
        block, per expert (the tensor is E x out x in); [] for a dense FFN."""
        ex = self.arch.experts
        if not self.num_experts or ex is None:
            return []
        size = {"hidden": self.hidden_size, "expert": self.expert_intermediate_size,
                "expert2": 2 * self.expert_intermediate_size}
        return [(f"{ex.path}.{p}", size[o], size[i]) for p, (o, i) in zip(ex.params, ex.param_sizes)]

    def expert_params(self) -> int:
        """Parameters of one block's experts and router (0 for a dense FFN)."""
        if not self.num_experts:
            return 0
        h, i = self.hidden_size, self.expert_intermediate_size
        return self.num_experts * (3 * h * i) + self.num_experts * h


def dims_from_config(cfg: dict) -> ModelDims:
    """ModelDims from a config.json dict of any family engine.arch describes."""
    mt = cfg.get("model_type", "")
    arch = arch_for_model_type(mt)
    h = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if h is None or heads is None or layers is None:
        raise KeyError("hidden_size / num_attention_heads / num_hidden_layers")
    inter = cfg.get("intermediate_size", cfg.get("n_inner")) or 4 * h
    experts = arch.experts
    # transformers 5.x writes Qwen3-MoE's num_experts as num_local_experts (an attribute alias): read either
    n_exp = int(cfg[experts.num_key] if experts.num_key in cfg else cfg["num_local_experts"]) if experts else 0
    if experts and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1):
        raise ValueError("model: mixture-of-experts configs with dense layers (mlp_only_layers, "
                         "decoder_sparse_step) are not supported")
    learned = arch.positions == "learned"
    kv_heads = cfg.get("num_key_value_heads") or heads
    return ModelDims(
        family=arch.family, model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=h, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=cfg.get("head_dim") or h // heads, intermediate_size=inter, gated_ffn=arch.gated_ffn,
        tie_word_embeddings=cfg.get("tie_word_embeddings", arch.is_encoder or arch.conv1d),
        max_position_embeddings=cfg.get("max_position_embeddings", cfg.get("n_positions",
                                                                          512 if learned else 2048)),
        type_vocab_size=cfg.get("type_vocab_size", 2) if arch.token_types else 0,
        attention_bias=cfg.get("attention_bias", arch.is_encoder), mlp_bias=cfg.get("mlp_bias", arch.is_encoder),
        qkv_bias=arch.qkv_bias, norm=arch.norm, arch=arch,
        num_experts=n_exp, experts_per_token=int(cfg.get(experts.active_key, 0)) if experts else 0,
        expert_intermediate_size=int(cfg[experts.intermediate_key]) if experts else 0,
        embedding_size=int(cfg.get("embedding_size") or h) if arch.embedding_projection else 0,
        position_biased_input=bool(cfg.get("position_biased_input", True)),
        relative_params=_relative_params(cfg, arch, h, layers, learned),
        pooler_hidden_size=int(cfg.get("pooler_hidden_size") or h) if arch.embedding_projection else 0,
        relative_linears=_relative_linears(cfg, arch),
        logit_transform=bool(arch.logit_softcap_key and cfg.get(arch.logit_softcap_key))
        or (arch.logits_divisor_key is not None and cfg.get(arch.logits_divisor_key, 1.0) not in (None, 1, 1.0)),
        relative_norm=arch.positions == "relative" and bool(cfg.get("relative_attention", False))
        and "layer_norm" in str(cfg.get("norm_rel_ebd", "none")),
        relative_span=_relative_span(cfg, arch), relative_kinds=_relative_kinds(cfg, arch),
        relative_shared=bool(cfg.get("share_att_key", False)) if arch.positions == "relative" else False,
        sliding_layers=_sliding_layers(cfg, arch, layers),
        sliding_window=int(cfg.get(arch.local_attention_key) or 0) // 2 if arch.local_attention_key else 0)


def _relative_span(cfg: dict, arch: Arch) -> int:
    """DeBERTa's attention span: position_buckets when set, else max_relative_positions
    (max_position_embeddings when unset); 0 without relative attention."""
    if arch.positions != "relative" or not cfg.get("relative_attention", False):
        return 0
    buckets = cfg.get("position_buckets", -1)
    max_rel = cfg.get("max_relative_positions", -1)
    if max_rel < 1:
        max_rel = cfg.get("max_position_embeddings", 512)
    return buckets if buckets > 0 else max_rel


def _relative_kinds(cfg: dict, arch: Arch) -> tuple:
    if not _relative_span(cfg, arch):
        return ()
    kinds = cfg.get("pos_att_type") or []
    kinds = kinds.split("|") if isinstance(kinds, str) else list(kinds)
    return tuple(k for k in ("c2p", "p2c") if k in [x.strip().lower() for x in kinds])


def _sliding_layers(cfg: dict, arch: Arch, layers: int) -> tuple:
    """The blocks that attend locally: the config's layer_types, or (a config without
    them) all but every n-th from block 0 on (the family's Arch.global_every)."""
    if not arch.local_attention_key:
        return ()
    types = cfg.get("layer_types")
    if types:
        return tuple(i for i, t in enumerate(types[:layers]) if t == "sliding_attention")
    key, default = arch.global_every or ("", 1)
    every = int(cfg.get(key) or default)
    return tuple(i for i in range(layers) if i % every)


def _relative_linears(cfg: dict, arch: Arch) -> tuple:
    """DeBERTa's per-block position projections: with relative attention and unshared
    keys, pos_key_proj for c2p and pos_query_proj for p2c."""
    if arch.positions != "relative" or not cfg.get("relative_attention", False) or cfg.get("share_att_key", False):
        return ()
    kinds = cfg.get("pos_att_type") or []
    kinds = kinds.split("|") if isinstance(kinds, str) else list(kinds)
    base = arch.q.rsplit(".", 1)[0]
    return tuple(f"{base}.{name}" for kind, name in (("c2p", "pos_key_proj"), ("p2c", "pos_query_proj"))
                 if kind in kinds)


def _relative_params(cfg: dict, arch: Arch, h: int, layers: int, learned: bool) -> int:
    """DeBERTa's relative position embeddings, their LayerNorm and unshared projections."""
    if arch.positions != "relative" or not cfg.get("relative_attention", False):
        return 0
    n = 2 * _relative_span(cfg, arch) * h
    if "layer_norm" in str(cfg.get("norm_rel_ebd", "none")):
        n += 2 * h
    return n


def dims_of_model(model) -> ModelDims:
    return dims_from_config(model.config.to_dict())
