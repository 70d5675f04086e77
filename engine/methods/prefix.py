"""Prefix tuning.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
ACL 2021, arXiv:2101.00190 — trainable key/value vectors prepended to the keys
and values of every attention layer. Training optimises them through an MLP
reparameterisation (P = MLP(P'), which the paper found more stable); after
training only P is kept: we fold the MLP away for saving and inference, which
is also peft's `prompt_embeddings` layout, [num_virtual_tokens,
num_layers * 2 * kv_heads * head_dim] (per layer: keys then values, heads then
head_dim).

How the prefix gets in, with transformers 5's Cache API: a forward pre-hook on
the backbone (LlamaModel / BertModel) builds a `DynamicCache` (or fills the one
`generate` passed, while it is still empty) with the prefix keys/values of each
layer, extends the 2-D attention mask with ones for the prefix slots and shifts
given position ids by the prefix length. LlamaAttention and BertSelfAttention
call `past_key_values.update(k, v, layer_idx)`, which concatenates the prefix in
front of the new keys/values; RoPE is not applied to the prefix keys, and real
tokens take positions N.. (peft does the same). Under grouped-query attention
the prefix has `num_key_value_heads` heads.

`PrefixBank` also serves the S4 composition, where only some layers (a group)
carry a prefix and groups have different lengths: every layer then has
N_max slots and a pre-hook on each attention module masks the slots that layer
does not use.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from ..arch import arch_for_model_type, arch_of, blocks
from .base import ApplyContext, MethodConfig, MethodSpec, PeftExport, freeze_all
from .plan import Plan, empty_plan
from .prompts import (as_kwargs, backbone, cache_length, check_absolute_positions, check_shape, extend_mask,
                      get_cache, load_named_tensors, peft_head_tensors, set_cache)

BANK_ATTR = "studio_prefix"


class PrefixTuningConfig(MethodConfig):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, gt=0, le=4096, description="prefix length N per layer")
    projection: bool = Field(True, description="train through an MLP reparameterisation (the paper); folded for saving")
    encoder_hidden_size: Optional[int] = Field(None, gt=0, le=65536,
                                               description="MLP width; default kv_heads * head_dim")


def kv_shape(model_config) -> tuple[int, int]:
    """(kv_heads, head_dim) of the attention layers."""
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    hd = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return kv, hd


class PrefixKV(nn.Module):
    """The prefixes of a set of layers: forward() gives [n, len(layers) * 2 * kv_heads * head_dim]."""

    def __init__(self, layers: list[int], n: int, kv_heads: int, head_dim: int, projection: bool,
                 hidden: Optional[int], *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.layers = list(layers)
        self.n, self.kv_heads, self.head_dim = n, kv_heads, head_dim
        kv_dim = kv_heads * head_dim
        out = len(layers) * 2 * kv_dim
        if projection:
            hidden = hidden or kv_dim
            self.embedding = nn.Parameter(torch.randn(n, kv_dim, **kw))
            self.mlp = nn.Sequential(nn.Linear(kv_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, out, **kw))
        else:
            self.embedding = nn.Parameter(torch.randn(n, out, **kw) * 0.02)
            self.mlp = None
        self.folded: Optional[nn.Parameter] = None

    @property
    def out_dim(self) -> int:
        return len(self.layers) * 2 * self.kv_heads * self.head_dim

    def forward(self) -> torch.Tensor:
        if self.folded is not None:
            return self.folded
        if self.mlp is None:
            return self.embedding
        return self.mlp(self.embedding)

    @torch.no_grad()
    def load_folded(self, flat: torch.Tensor) -> None:
        check_shape("prompt_embeddings", flat, (self.n, self.out_dim))
        self.folded = nn.Parameter(flat.to(self.embedding.dtype).clone(), requires_grad=False)
        self.mlp = None

    def per_layer(self, batch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (keys, values)}, each [batch, kv_heads, n, head_dim]."""
        flat = self()
        x = flat.view(self.n, len(self.layers) * 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        out = {}
        for j, layer in enumerate(self.layers):
            k, v = x[2 * j], x[2 * j + 1]
            out[layer] = (k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1))
        return out


class PrefixBank(nn.Module):
    """All prefix groups of a model. Every layer gets `slots` = max group length
    cache entries; layers that use fewer (or none) have the rest masked."""

    def __init__(self, groups: list[PrefixKV], num_layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.groups = nn.ModuleList(groups)
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        seen = [l for g in groups for l in g.layers]
        if len(seen) != len(set(seen)):
            raise ValueError("method: a layer belongs to two prefix groups")

    @property
    def slots(self) -> int:
        return max(g.n for g in self.groups)

    def used(self, layer: int) -> int:
        """How many prefix slots `layer` attends to."""
        return next((g.n for g in self.groups if layer in g.layers), 0)

    def fill(self, cache, batch: int, like: torch.Tensor) -> None:
        s = self.slots
        shape = (batch, self.kv_heads, s, self.head_dim)
        kvs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for g in self.groups:
            kvs.update(g.per_layer(batch))
        for layer in range(self.num_layers):
            if layer in kvs:
                k, v = kvs[layer]
                if k.shape[2] < s:   # pad at the end; the padding is masked for this layer
                    pad = like.new_zeros(batch, self.kv_heads, s - k.shape[2], self.head_dim)
                    k, v = torch.cat([k, pad], dim=2), torch.cat([v, pad], dim=2)
            else:
                k = v = like.new_zeros(shape)
            cache.update(k.to(like.dtype), v.to(like.dtype), layer)


def new_cache(model_config):
    from transformers import DynamicCache
    return DynamicCache(config=model_config) if arch_for_model_type(model_config.model_type).is_decoder \
        else DynamicCache()


def prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    bank: PrefixBank = getattr(module, BANK_ATTR)
    kw = as_kwargs(module, args, kwargs)
    past = get_cache(kw)
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    batch, cur = ref.shape[0], ref.shape[1]
    if cache_length(past) == 0:
        check_absolute_positions(module, bank.slots, cur)
        if past is None:
            past = new_cache(module.config)
            set_cache(module, kw, past)
        like = embeds if embeds is not None else module.get_input_embeddings().weight
        bank.fill(past, batch, like.detach().new_empty(0))
    s = bank.slots
    kw["attention_mask"] = extend_mask(kw.get("attention_mask"), s, cache_length(past) + cur)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = kw["position_ids"] + s
    return (), kw


# ---- layers that use only part of the slots (S4 groups) -------------------------------------------

def mask_slots(mask: Optional[torch.Tensor], start: int, stop: int, q_len: int, kv_len: int,
               device, dtype) -> torch.Tensor:
    """A 4-D attention mask with key columns [start, stop) hidden."""
    if mask is None:
        mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    else:
        mask = mask.clone()
    if mask.dtype == torch.bool:
        mask[..., start:stop] = False
    else:
        mask[..., start:stop] = torch.finfo(mask.dtype).min
    return mask


def make_slot_mask_hook(layer: int):
    def hook(attn: nn.Module, args: tuple, kwargs: dict):
        bank: PrefixBank = attn._studio_prefix_bank[0]
        used, s = bank.used(layer), bank.slots
        if used >= s:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        past = get_cache(kwargs)
        kv_len = cache_length_of_layer(past, layer) + hidden.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 4:
            raise ValueError("method: per-layer prefixes need 4-D attention masks (eager or sdpa attention)")
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask_slots(mask, used, s, hidden.shape[1], kv_len, hidden.device, hidden.dtype)
        return args, kwargs
    return hook


def cache_length_of_layer(past, layer: int) -> int:
    if past is None:
        return 0
    return int(past.get_seq_length(layer))


def attention_module(model: nn.Module, layer: int) -> nn.Module:
    arch = arch_of(model)
    block = blocks(model)[layer]
    return block.get_submodule(arch.prefix_attn_path or arch.attn_path)


def attach_prefix_bank(model: nn.Module, bank: PrefixBank) -> None:
    bb = backbone(model)
    if hasattr(bb, BANK_ATTR):
        raise ValueError("method: the model already has prefixes")
    setattr(bb, BANK_ATTR, bank)
    bb.register_forward_pre_hook(prefix_pre_hook, with_kwargs=True)
    for layer in range(bank.num_layers):
        if bank.used(layer) < bank.slots:
            attn = attention_module(model, layer)
            attn._studio_prefix_bank = [bank]      # a list: not registered as a submodule twice
            attn.register_forward_pre_hook(make_slot_mask_hook(layer), with_kwargs=True)


def prefix_bank(model: nn.Module) -> PrefixBank:
    return getattr(backbone(model), BANK_ATTR)


def new_prefix_group(model: nn.Module, layers: list[int], n: int, projection: bool,
                     hidden: Optional[int]) -> PrefixKV:
    kv, hd = kv_shape(model.config)
    w = model.get_input_embeddings().weight
    return PrefixKV(layers, n, kv, hd, projection, hidden, device=w.device, dtype=w.dtype)


def add_prefix_groups(model: nn.Module, groups: list[tuple[list[int], int]], projection: bool,
                      hidden: Optional[int]) -> None:
    """groups: [(layers, n)]. Does not freeze."""
    kv, hd = kv_shape(model.config)
    prefixes = [new_prefix_group(model, layers, n, projection, hidden) for layers, n in groups if layers]
    if prefixes:
        attach_prefix_bank(model, PrefixBank(prefixes, model.config.num_hidden_layers, kv, hd))


def check_prefix_family(model: nn.Module, method: str) -> None:
    arch = arch_of(model)
    if not arch.kv_prefix:
        raise ValueError(f"method.name: {method} needs attention that takes a key/value cache; "
                         f"{arch.family} attention does not")
    if arch.is_encoder and getattr(model.config, "is_decoder", False):
        raise ValueError(f"method.name: {method} on a BERT decoder is not supported")


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig, ctx: ApplyContext) -> None:
    check_prefix_family(model, "prefix_tuning")
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    all_layers = list(range(model.config.num_hidden_layers))
    add_prefix_groups(model, [(all_layers, cfg.num_virtual_tokens)], cfg.projection, cfg.encoder_hidden_size)


def count_prefix_group(dims, n_layers: int, n: int, projection: bool, hidden: Optional[int]) -> int:
    kv_dim = dims.num_kv_heads * dims.head_dim
    out = n_layers * 2 * kv_dim
    if not projection:
        return n * out
    e = hidden or kv_dim
    return n * kv_dim + (kv_dim * e + e) + (e * out + out)


def count_prefix_tuning(dims, cfg: PrefixTuningConfig, task: str) -> int:
    return count_prefix_group(dims, dims.num_layers, cfg.num_virtual_tokens, cfg.projection, cfg.encoder_hidden_size)


def export_prefix_peft(model: nn.Module, cfg: PrefixTuningConfig, ctx: ApplyContext) -> PeftExport:
    bank = prefix_bank(model)
    (group,) = bank.groups
    kv, hd = kv_shape(model.config)
    config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": group.n,
        "token_dim": kv * hd,
        "num_attention_heads": kv,
        "num_layers": model.config.num_hidden_layers,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": kv * hd,
        "prefix_projection": False,
        "inference_mode": True,
    }
    with torch.no_grad():
        return PeftExport(config, {"prompt_embeddings": group().detach().clone(), **peft_head_tensors(model, ctx)})


def fold_prefixes(model: nn.Module) -> None:
    """Replace each MLP reparameterisation by its output (for inference)."""
    for g in prefix_bank(model).groups:
        with torch.no_grad():
            g.load_folded(g().detach())


def load_prefix_state(model: nn.Module, tensors: dict) -> None:
    rest = dict(tensors)
    flat = rest.pop("prompt_embeddings", None)
    if flat is None:
        raise ValueError("adapter: no 'prompt_embeddings' tensor")
    (group,) = prefix_bank(model).groups
    group.load_folded(flat)
    load_named_tensors(model, rest)


def plan_prefix_tuning(dims, cfg: PrefixTuningConfig, task: str) -> Plan:
    plan = empty_plan(dims)
    for lp in plan.layers:
        lp.prefix = int(cfg.num_virtual_tokens)
    return plan


SPEC = MethodSpec(
    name="prefix_tuning", config_cls=PrefixTuningConfig, apply=apply_prefix_tuning,
    paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation (arXiv:2101.00190)",
    summary="Trainable key/value prefixes in every attention layer (through the KV cache); MLP folded for saving.",
    trains="the prefix embeddings and their MLP reparameterisation (saved folded: N x layers*2*kv_heads*head_dim)",
    peft_export=export_prefix_peft, count_trainable=count_prefix_tuning, load_state=load_prefix_state,
    family="prompt", plan=plan_prefix_tuning,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)
