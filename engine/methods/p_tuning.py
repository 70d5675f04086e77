"""P-tuning: virtual tokens produced by a trainable prompt encoder.

Liu, Zheng, Du, Ding, Qian, Yang & Tang 2021, "GPT Understands, Too",
arXiv:2103.10385.

Trainable input embeddings go through a bidirectional LSTM and an MLP (or an MLP
alone) to give the N virtual tokens, prepended like prompt tuning's (hooks in
engine.methods.prompts). After training only the encoder's output is needed: it
is folded for saving, as peft does (peft P_TUNING, `prompt_embeddings`). Not
mergeable.
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


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig, ctx: ApplyContext) -> None:
    backbone(model)
    check_soft_prompt(model, "p_tuning")
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    dim = model.config.hidden_size
    w = model.get_input_embeddings().weight
    enc = PromptEncoder(cfg.num_virtual_tokens, dim, cfg.encoder_hidden_size or dim, cfg.encoder_type,
                        cfg.encoder_num_layers, cfg.encoder_dropout, device=w.device, dtype=w.dtype)
    attach_prompt(model, enc)


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


def plan_p_tuning(dims, cfg: PTuningConfig, task: str) -> Plan:
    return prompt_plan(dims, cfg.num_virtual_tokens)


def export_p_tuning_peft(model: nn.Module, cfg: PTuningConfig, ctx: ApplyContext) -> PeftExport:
    src = prompt_source(model)
    config = {"peft_type": "P_TUNING", "encoder_reparameterization_type": cfg.encoder_type.upper(),
              "encoder_hidden_size": cfg.encoder_hidden_size or model.config.hidden_size,
              "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout,
              **prompt_learning_fields(model, src.num_tokens)}
    with torch.no_grad():
        return PeftExport(config, {"prompt_embeddings": src().detach().clone(), **peft_head_tensors(model, ctx)})


SPEC = MethodSpec(
    name="p_tuning", config_cls=PTuningConfig, apply=apply_p_tuning,
    paper="Liu et al. 2021, GPT Understands, Too (arXiv:2103.10385)",
    summary="Virtual tokens produced by a trainable MLP or bi-LSTM prompt encoder; folded for saving.",
    trains="the prompt encoder's input embeddings and its MLP / LSTM",
    peft_export=export_p_tuning_peft, count_trainable=count_p_tuning, load_state=load_prompt_state,
    family="prompt", plan=plan_p_tuning,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)
