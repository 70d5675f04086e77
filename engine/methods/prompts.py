"""Soft prompts: prompt tuning and P-tuning.

Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", EMNLP 2021, arXiv:2104.08691 — N trainable "virtual token"
embeddings prepended to the input embeddings; the model stays frozen.

Liu, Zheng, Du, Ding, Qian, Yang & Tang 2021, "GPT Understands, Too",
arXiv:2103.10385 (P-tuning) — the virtual tokens are produced by a small prompt
encoder (a bidirectional LSTM followed by an MLP, or an MLP alone) from
trainable input embeddings; after training the encoder's output is all that is
needed (we fold it for saving, as peft does).

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
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..arch import arch_of
from .base import ApplyContext, MethodConfig, PeftExport, freeze_all

PROMPT_ATTR = "studio_prompt"


class PromptTuningConfig(MethodConfig):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, gt=0, le=4096, description="N virtual tokens prepended to every input")
    init: Literal["random", "text"] = Field("random", description="random, or the embeddings of init_text")
    init_text: Optional[str] = Field(None, description="text whose token embeddings initialise the prompt")

    @model_validator(mode="after")
    def _text_init(self):
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise ValueError("method.init_text: required (non-empty) when method.init is 'text'")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("method.init_text: only used with method.init: text")
        return self


class PTuningConfig(MethodConfig):
    name: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, gt=0, le=4096)
    encoder_type: Literal["mlp", "lstm"] = Field("mlp", description="prompt encoder: MLP, or bi-LSTM + MLP (the paper)")
    encoder_hidden_size: Optional[int] = Field(None, gt=0, le=65536, description="default: the model's hidden size")
    encoder_num_layers: int = Field(2, gt=0, le=8, description="LSTM layers (lstm only)")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LSTM dropout between layers (lstm only)")

    @model_validator(mode="after")
    def _lstm_only(self):
        if self.encoder_type == "mlp":
            if "encoder_num_layers" in self.model_fields_set:
                raise ValueError("method.encoder_num_layers: only used with method.encoder_type: lstm")
            if "encoder_dropout" in self.model_fields_set:
                raise ValueError("method.encoder_dropout: only used with method.encoder_type: lstm")
        return self


# ---- the virtual-token sources ------------------------------------------------------------------

class SoftPrompt(nn.Module):
    """N trainable embeddings."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(init.clone())

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        return self.embedding

    @torch.no_grad()
    def load_folded(self, prompt: torch.Tensor) -> None:
        check_shape("prompt_embeddings", prompt, self.embedding.shape)
        self.embedding.copy_(prompt.to(self.embedding.dtype))


class PromptEncoder(nn.Module):
    """P-tuning: trainable input embeddings -> (bi-LSTM ->) MLP -> virtual tokens.
    After `load_folded`, the encoder is gone and a fixed tensor is returned."""

    def __init__(self, n: int, dim: int, hidden: int, kind: str, lstm_layers: int, dropout: float,
                 *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.kind = kind
        self.embedding = nn.Parameter(torch.empty(n, dim, **kw))
        nn.init.normal_(self.embedding)
        if kind == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=lstm_layers, dropout=dropout if lstm_layers > 1 else 0.0,
                                bidirectional=True, batch_first=True, **kw)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                     nn.Linear(2 * hidden, dim, **kw))
        else:
            self.lstm = None
            self.mlp = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                     nn.ReLU(), nn.Linear(hidden, dim, **kw))
        self.folded: Optional[nn.Parameter] = None

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        if self.folded is not None:
            return self.folded
        x = self.embedding.unsqueeze(0)
        if self.lstm is not None:
            x = self.lstm(x)[0]
        return self.mlp(x)[0]

    @torch.no_grad()
    def load_folded(self, prompt: torch.Tensor) -> None:
        """Replace the encoder by its output (what peft saves as `prompt_embeddings`)."""
        check_shape("prompt_embeddings", prompt, self.embedding.shape)
        self.folded = nn.Parameter(prompt.to(self.embedding.dtype).clone(), requires_grad=False)
        self.lstm = None
        self.mlp = None


def check_shape(key: str, t: torch.Tensor, want) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"adapter tensor {key}: shape {tuple(t.shape)} does not fit this model {tuple(want)}")


# ---- hooking the backbone -----------------------------------------------------------------------

def backbone(model: nn.Module) -> nn.Module:
    """The bare transformer under the task head: LlamaModel or BertModel."""
    fam = arch_of(model).family
    if fam == "llama":
        return model.model
    if fam == "bert":
        return model.bert
    raise ValueError(f"method: prompt methods support llama and bert models, not {fam}")


def _get(args: tuple, kwargs: dict, name: str, pos: int):
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
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
    if cfg is None or limit is None or getattr(cfg, "model_type", "") not in ("bert", "roberta", "deberta-v2"):
        return
    if n_virtual + seq > limit:
        raise ValueError(f"method.num_virtual_tokens: {n_virtual} virtual tokens + sequences of {seq} tokens "
                         f"exceed this model's {limit} positions; lower training.max_seq_len to "
                         f"{limit - n_virtual} or use fewer virtual tokens")


def prompt_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    source = getattr(module, PROMPT_ATTR)
    n = source.num_tokens
    kw = _as_kwargs(module, args, kwargs)
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


def attach_prompt(model: nn.Module, source: nn.Module) -> None:
    bb = backbone(model)
    if hasattr(bb, PROMPT_ATTR):
        raise ValueError("method: the model already has a soft prompt")
    setattr(bb, PROMPT_ATTR, source)
    bb.register_forward_pre_hook(prompt_pre_hook, with_kwargs=True)
    bb.register_forward_hook(strip_post_hook, with_kwargs=True)


def prompt_source(model: nn.Module) -> nn.Module:
    return getattr(backbone(model), PROMPT_ATTR)


# ---- initialisation -----------------------------------------------------------------------------

def text_init_embeddings(model: nn.Module, tokenizer, text: str, n: int) -> torch.Tensor:
    """The embeddings of `text`'s tokens, repeated / truncated to n rows."""
    if tokenizer is None:
        raise ValueError("method.init: 'text' needs the model's tokenizer, and none was given")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"method.init_text: {text!r} gives no tokens")
    ids = (ids * (n // len(ids) + 1))[:n]
    emb = model.get_input_embeddings().weight
    return emb[torch.tensor(ids, device=emb.device)].detach().clone()


def random_init_embeddings(model: nn.Module, n: int) -> torch.Tensor:
    """Random vectors with the scale of the model's word embeddings."""
    emb = model.get_input_embeddings().weight
    std = 1.0 if emb.is_meta else float(emb.detach().float().std())
    return torch.randn(n, emb.shape[1], device=emb.device, dtype=emb.dtype) * std


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig, ctx: ApplyContext) -> None:
    backbone(model)
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    n = cfg.num_virtual_tokens
    init = text_init_embeddings(model, ctx.tokenizer, cfg.init_text, n) if cfg.init == "text" \
        else random_init_embeddings(model, n)
    attach_prompt(model, SoftPrompt(init))


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig, ctx: ApplyContext) -> None:
    backbone(model)
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    dim = model.config.hidden_size
    w = model.get_input_embeddings().weight
    enc = PromptEncoder(cfg.num_virtual_tokens, dim, cfg.encoder_hidden_size or dim, cfg.encoder_type,
                        cfg.encoder_num_layers, cfg.encoder_dropout, device=w.device, dtype=w.dtype)
    attach_prompt(model, enc)


# ---- counts ------------------------------------------------------------------------------------

def count_prompt_tuning(dims, cfg: PromptTuningConfig, task: str) -> int:
    return cfg.num_virtual_tokens * dims.hidden_size


def lstm_params(inp: int, hidden: int, layers: int) -> int:
    """A bidirectional nn.LSTM: per direction and layer 4h x (in + h) weights and two 4h biases."""
    total = 0
    for i in range(layers):
        d_in = inp if i == 0 else 2 * hidden
        total += 2 * (4 * hidden * (d_in + hidden) + 8 * hidden)
    return total


def count_p_tuning(dims, cfg: PTuningConfig, task: str) -> int:
    d = dims.hidden_size
    e = cfg.encoder_hidden_size or d
    n = cfg.num_virtual_tokens * d
    if cfg.encoder_type == "lstm":
        return n + lstm_params(d, e, cfg.encoder_num_layers) + (2 * e * 2 * e + 2 * e) + (2 * e * d + d)
    return n + (d * e + e) + (e * e + e) + (e * d + d)


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
    from ..prepare import head_modules
    return {f"base_model.{name}.{pname}": p.detach().clone()
            for name, head in head_modules(model) for pname, p in head.named_parameters()}


def export_prompt_tuning_peft(model: nn.Module, cfg: PromptTuningConfig, ctx: ApplyContext) -> PeftExport:
    src = prompt_source(model)
    config = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
              **prompt_learning_fields(model, src.num_tokens)}
    with torch.no_grad():
        return PeftExport(config, {"prompt_embeddings": src().detach().clone(), **peft_head_tensors(model, ctx)})


def export_p_tuning_peft(model: nn.Module, cfg: PTuningConfig, ctx: ApplyContext) -> PeftExport:
    src = prompt_source(model)
    config = {"peft_type": "P_TUNING", "encoder_reparameterization_type": cfg.encoder_type.upper(),
              "encoder_hidden_size": cfg.encoder_hidden_size or model.config.hidden_size,
              "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout,
              **prompt_learning_fields(model, src.num_tokens)}
    with torch.no_grad():
        return PeftExport(config, {"prompt_embeddings": src().detach().clone(), **peft_head_tensors(model, ctx)})


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
