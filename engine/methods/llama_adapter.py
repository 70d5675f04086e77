"""LLaMA-Adapter: adaption prompts with zero-initialised attention gating.

Zhang, Han, Liu, Gao, Zhou, Hu, Yan, Lu, Li & Qiao 2023, "LLaMA-Adapter:
Efficient Fine-tuning of Language Models with Zero-init Attention",
arXiv:2303.16199.

In each of the top L layers a learnable adaption prompt P (K x hidden) is
projected by the layer's frozen k/v projections (no rotary embedding); the
queries of the real tokens attend to it with a softmax of their own, and the
result is multiplied by a gate g initialised to zero (one per head, as in the
authors' code) before it joins the ordinary attention output through the
output projection:

    out = o_proj(attn(q, K, V) + g * softmax(q K_p^T / sqrt(d)) V_p)

so training starts exactly at the base model. Under grouped-query attention
the prompt keys/values have num_key_value_heads heads, shared by their query
groups. Llama-architecture models only; not mergeable (the prompt attention is
input-dependent).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from ..arch import arch_of, blocks
from .base import ApplyContext, MethodConfig, MethodSpec, freeze_all
from .plan import Plan, empty_plan

ATTR = "adaption_prompt"


class LlamaAdapterConfig(MethodConfig):
    name: Literal["llama_adapter"] = "llama_adapter"
    adapter_len: int = Field(10, gt=0, le=1024, description="K: adaption-prompt tokens per layer")
    adapter_layers: Optional[int] = Field(None, gt=0, le=1024,
                                          description="L: adapt the top L layers (default: min(8, the model's layers))")


class AdaptionPrompt(nn.Module):
    def __init__(self, k: int, hidden: int, heads: int, *, device=None, dtype=None):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(k, hidden, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(heads, device=device, dtype=dtype))


def repeat_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[kv_heads, K, d] -> [kv_heads * groups, K, d], each kv head serving `groups` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=0)


def adaption_output(attn: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The gated prompt attention of one LlamaAttention, already through o_proj's weight."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ad: AdaptionPrompt = getattr(attn, ATTR)
    b, t, _ = hidden.shape
    hd = attn.head_dim
    q = attn.q_proj(hidden).view(b, t, -1, hd).transpose(1, 2)            # [b, H, t, d]
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    prompt = ad.prompt.to(hidden.dtype)
    k = attn.k_proj(prompt).view(prompt.shape[0], -1, hd).transpose(0, 1)  # [kvH, K, d]
    v = attn.v_proj(prompt).view(prompt.shape[0], -1, hd).transpose(0, 1)
    groups = q.shape[1] // k.shape[0]
    k, v = repeat_kv_heads(k, groups), repeat_kv_heads(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling          # [b, H, t, K]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = probs * ad.gate.to(q.dtype).view(1, -1, 1, 1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)        # [b, t, H*d]
    return nn.functional.linear(out, attn.o_proj.weight)


def adaption_hook(attn: nn.Module, args: tuple, kwargs: dict, output):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    pe = kwargs.get("position_embeddings")
    if pe is None:
        pe = args[1]
    extra = adaption_output(attn, hidden, pe)
    return (output[0] + extra,) + tuple(output[1:])


DEFAULT_LAYERS = 8


def adapted_layers(cfg: LlamaAdapterConfig, n_layers: int) -> int:
    """L: the configured value (an error if the model has fewer layers), else min(8, layers)."""
    if cfg.adapter_layers is None:
        return min(DEFAULT_LAYERS, n_layers)
    if cfg.adapter_layers > n_layers:
        raise ValueError(f"method.adapter_layers: {cfg.adapter_layers} is more than the model's {n_layers} layers")
    return cfg.adapter_layers


def check_llama(model: nn.Module, cfg: LlamaAdapterConfig) -> tuple[int, int]:
    arch = arch_of(model)
    if not arch.adaption_prompt:
        raise ValueError(f"method.name: llama_adapter needs a Llama-architecture model (decoder with rotary "
                         f"attention: separate q/k/v projections, no q/k norm); this model is {arch.family}. "
                         f"Use prefix_tuning or prompt_tuning instead.")
    n = model.config.num_hidden_layers
    return n, adapted_layers(cfg, n)


def apply_llama_adapter(model: nn.Module, cfg: LlamaAdapterConfig, ctx: ApplyContext) -> None:
    n, n_adapted = check_llama(model, cfg)
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    arch = arch_of(model)
    w = model.get_input_embeddings().weight
    for i in range(n - n_adapted, n):
        attn = blocks(model)[i].get_submodule(arch.attn_path)
        setattr(attn, ATTR, AdaptionPrompt(cfg.adapter_len, model.config.hidden_size,
                                           model.config.num_attention_heads, device=w.device, dtype=w.dtype))
        attn.register_forward_hook(adaption_hook, with_kwargs=True)


def count_llama_adapter(dims, cfg: LlamaAdapterConfig, task: str) -> int:
    if not dims.arch.adaption_prompt:
        raise ValueError(f"method.name: llama_adapter needs a Llama-architecture model, not {dims.family}")
    return adapted_layers(cfg, dims.num_layers) * (cfg.adapter_len * dims.hidden_size + dims.num_heads)


def plan_llama_adapter(dims, cfg: LlamaAdapterConfig, task: str) -> Plan:
    plan = empty_plan(dims)
    for lp in plan.layers[max(0, dims.num_layers - adapted_layers(cfg, dims.num_layers)):]:
        lp.adaption_prompt = int(cfg.adapter_len)
    return plan


SPEC = MethodSpec(
    name="llama_adapter", config_cls=LlamaAdapterConfig, apply=apply_llama_adapter,
    paper="Zhang et al. 2023, LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention "
          "(arXiv:2303.16199)",
    summary="Adaption prompts in the top L layers, joined through zero-initialised per-head gates (Llama only).",
    trains="per-layer adaption prompts (adapter_len x hidden) and gates (one per head)",
    count_trainable=count_llama_adapter, family="prompt", plan=plan_llama_adapter,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)
