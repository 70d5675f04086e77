"""Soft prompts: the machinery prompt tuning (engine.methods.prompt_tuning) and
P-tuning (engine.methods.p_tuning) share, and prefix tuning partly reuses.

How the virtual tokens get in: a forward pre-hook on the backbone (LlamaModel
`model.model`, BertModel `model.bert`) turns `input_ids` into embeddings and
prepends the N prompt vectors, extends `attention_mask` with N ones (and
`token_type_ids` with zeros, `position_ids` so the virtual tokens take positions
0..N-1); a forward hook strips the N virtual positions from `last_hidden_state`.
So `model(...)`, `model.get_decoder()(...)` (the engine's chunked causal loss) and
`model.generate(...)` all see outputs aligned with their own inputs, and labels
need no change. During generation the virtual tokens live in the KV cache after
the first step; later steps only get their attention mask / position ids
shifted by N. Caveats (the same as peft's): BERT's pooler reads position 0,
which is the first virtual token; `output_hidden_states` includes the virtual
positions.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..arch import arch_for_model_type, arch_of, head_modules
from .base import ApplyContext
from .plan import Plan, empty_plan

PROMPT_ATTR = "studio_prompt"


# ---- shapes ---------------------------------------------------------------------------------------

def check_shape(key: str, t: torch.Tensor, want) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"adapter tensor {key}: shape {tuple(t.shape)} does not fit this model {tuple(want)}")


# ---- hooking the backbone -----------------------------------------------------------------------

def backbone(model: nn.Module) -> nn.Module:
    """The bare transformer under the task head (LlamaModel, BertModel, ...), as the
    architecture names it."""
    arch = arch_of(model)
    if not arch.backbone or not hasattr(model, arch.backbone):
        raise ValueError(f"method: prompt methods need the bare transformer under the task head; "
                         f"{arch.family} has none by the name {arch.backbone!r}")
    return getattr(model, arch.backbone)


def as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of a backbone forward turned into keywords."""
    if not args:
        return dict(kwargs)
    import inspect
    names = list(inspect.signature(module.forward).parameters)
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


@functools.lru_cache(maxsize=None)
def _cache_param(forward_owner: type) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def get_cache(kw: dict):
    """The key/value cache a backbone call carries: transformers 5.2x calls the
    argument `cache` (`past_key_values` is its deprecated alias); both are read."""
    past = kw.get("cache")
    return past if past is not None else kw.get("past_key_values")


def set_cache(module: nn.Module, kw: dict, past) -> None:
    """Put `past` under the name `module.forward` takes, dropping the other spelling."""
    name = _cache_param(type(module))
    kw.pop("past_key_values" if name == "cache" else "cache", None)
    kw[name] = past


def cache_length(past) -> int:
    return 0 if past is None else int(past.get_seq_length())


def extend_mask(mask: Optional[torch.Tensor], n: int, want_len: int) -> Optional[torch.Tensor]:
    """Prepend n ones to a 2-D attention mask that is n short of `want_len`."""
    if mask is None or mask.dim() != 2 or mask.shape[1] != want_len - n:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def check_absolute_positions(module: nn.Module, n_virtual: int, seq: int) -> None:
    """Models with learned absolute positions (BERT: 512) cannot take more tokens
    than they have positions, and the virtual tokens count: say so instead of
    failing deep in the embedding layer."""
    cfg = getattr(module, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None)
    if cfg is None or limit is None or arch_for_model_type(getattr(cfg, "model_type", "")).positions == "rope":
        return
    if n_virtual + seq > limit:
        raise ValueError(f"method.num_virtual_tokens: {n_virtual} virtual tokens + sequences of {seq} tokens "
                         f"exceed this model's {limit} positions; lower training.max_seq_len to "
                         f"{limit - n_virtual} or use fewer virtual tokens")


def prompt_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    source = getattr(module, PROMPT_ATTR)
    n = source.num_tokens
    kw = as_kwargs(module, args, kwargs)
    past = get_cache(kw)
    past_len = cache_length(past)
    first = past_len == 0
    module._studio_strip = n if first else 0
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    if first:
        if embeds is None:
            embeds = module.get_input_embeddings()(ids)
        check_absolute_positions(module, n, embeds.shape[1])
        b = embeds.shape[0]
        prompt = source().to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        kw["input_ids"] = None
        cur = embeds.shape[1]
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n, n + cur)
        if kw.get("position_ids") is not None:
            pos = kw["position_ids"]
            virt = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)
            kw["position_ids"] = torch.cat([virt, pos + n], dim=1)
        if kw.get("token_type_ids") is not None:
            tt = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], n), tt], dim=1)
    else:
        cur = (ids if ids is not None else embeds).shape[1]
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n, past_len + cur)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + n
    return (), kw


def strip_post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    n = getattr(module, "_studio_strip", 0)
    module._studio_strip = 0
    if not n:
        return output
    if isinstance(output, tuple):
        return (output[0][:, n:],) + tuple(output[1:])
    output["last_hidden_state"] = output["last_hidden_state"][:, n:]
    return output


def check_soft_prompt(model: nn.Module, method: str) -> None:
    """Refuse virtual input tokens where the classification head pools the hidden states
    outside the backbone (RoBERTa's, DeBERTa's and ModernBERT's heads): there peft's
    prompt places the virtual tokens where the head reads, and this engine's does not."""
    arch = arch_of(model)
    if not arch.soft_prompt:
        raise ValueError(f"method.name: {method} does not support {arch.family} models: their classification head "
                         f"pools the hidden states outside the backbone, where a peft-format soft prompt and this "
                         f"engine's would disagree; use lora, prefix_tuning or another method")


def attach_prompt(model: nn.Module, source: nn.Module) -> None:
    bb = backbone(model)
    if hasattr(bb, PROMPT_ATTR):
        raise ValueError("method: the model already has a soft prompt")
    setattr(bb, PROMPT_ATTR, source)
    bb.register_forward_pre_hook(prompt_pre_hook, with_kwargs=True)
    bb.register_forward_hook(strip_post_hook, with_kwargs=True)


def prompt_source(model: nn.Module) -> nn.Module:
    return getattr(backbone(model), PROMPT_ATTR)


# ---- peft format ------------------------------------------------------------------------------

def prompt_learning_fields(model: nn.Module, n: int) -> dict:
    c = model.config
    return {
        "num_virtual_tokens": n,
        "token_dim": c.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": c.num_attention_heads,
        "num_layers": c.num_hidden_layers,
        "inference_mode": True,
    }


def peft_head_tensors(model: nn.Module, ctx: ApplyContext) -> dict:
    """Classification heads under the keys peft's prompt-learning models use
    (`base_model.<head>.<param>`: there the PeftModel wraps the transformers model directly)."""
    if ctx.task != "classification":
        return {}
    return {f"base_model.{name}.{pname}": p.detach().clone()
            for name, head in head_modules(model) for pname, p in head.named_parameters()}


def load_named_tensors(model: nn.Module, tensors: dict) -> None:
    """peft-keyed tensors (`base_model.model.<path>`, classification heads) into parameters by name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            name = key.removeprefix("base_model.model.") if key.startswith("base_model.model.") \
                else key.removeprefix("base_model.")
            name = name.replace(".modules_to_save.default.", ".")
            name = name.replace(".default.", ".")
            if name not in params:
                raise ValueError(f"adapter tensor {key!r} matches nothing in the model")
            check_shape(key, value, params[name].shape)
            params[name].copy_(value.to(params[name].dtype))


def load_prompt_state(model: nn.Module, tensors: dict) -> None:
    """Load what `export_*_peft` wrote (plus any classification head) into a model
    with the method applied; P-tuning's encoder is replaced by its folded output."""
    rest = dict(tensors)
    prompt = rest.pop("prompt_embeddings", None)
    if prompt is None:
        raise ValueError("adapter: no 'prompt_embeddings' tensor")
    prompt_source(model).load_folded(prompt)
    load_named_tensors(model, rest)


def prompt_plan(dims, n: int) -> Plan:
    """n virtual tokens in front of the input; the gradient reaches the input embeddings."""
    plan = empty_plan(dims)
    plan.prompt_tokens = int(n)
    plan.input_grad = True
    return plan
