"""Prompt tuning: N trainable virtual-token embeddings prepended to the input.

Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", EMNLP 2021, arXiv:2104.08691.

The model stays frozen; the N vectors start random (at the scale of the word
embeddings) or as the embeddings of a text. How they get into the forward pass
(hooks on the backbone) is in engine.methods.prompts. Exported as peft
PROMPT_TUNING (`prompt_embeddings`). Not mergeable.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from .base import ApplyContext, MethodConfig, MethodSpec, PeftExport, freeze_all
from .plan import Plan
from .prompts import (attach_prompt, backbone, check_shape, check_soft_prompt, load_prompt_state, peft_head_tensors,
                      prompt_learning_fields, prompt_plan, prompt_source)


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
    check_soft_prompt(model, "prompt_tuning")
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    n = cfg.num_virtual_tokens
    init = text_init_embeddings(model, ctx.tokenizer, cfg.init_text, n) if cfg.init == "text" \
        else random_init_embeddings(model, n)
    attach_prompt(model, SoftPrompt(init))


def count_prompt_tuning(dims, cfg: PromptTuningConfig, task: str) -> int:
    return cfg.num_virtual_tokens * dims.hidden_size


def plan_prompt_tuning(dims, cfg: PromptTuningConfig, task: str) -> Plan:
    return prompt_plan(dims, cfg.num_virtual_tokens)


def export_prompt_tuning_peft(model: nn.Module, cfg: PromptTuningConfig, ctx: ApplyContext) -> PeftExport:
    src = prompt_source(model)
    config = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
              **prompt_learning_fields(model, src.num_tokens)}
    with torch.no_grad():
        return PeftExport(config, {"prompt_embeddings": src().detach().clone(), **peft_head_tensors(model, ctx)})


SPEC = MethodSpec(
    name="prompt_tuning", config_cls=PromptTuningConfig, apply=apply_prompt_tuning,
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (arXiv:2104.08691)",
    summary="N trainable virtual-token embeddings prepended to the input embeddings.",
    trains="the soft-prompt embeddings (num_virtual_tokens x hidden)",
    peft_export=export_prompt_tuning_peft, count_trainable=count_prompt_tuning, load_state=load_prompt_state,
    family="prompt", plan=plan_prompt_tuning,
    default_lr=0.03,   # bench/RESULTS-default-lr.md
)
