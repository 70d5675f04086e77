"""Decoding, serving and the harness call the model the way training does (decoder, then
the output head), so they must apply the family's logit transform as the model's own
forward does: Granite divides its logits by `logits_scaling`, Gemma 2 soft-caps them.
Each path's logits are checked against `model(...).logits` on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.arch import output_head
from engine.generation import next_token_logits
from engine.models import tiny_config


def tiny_model(family: str, **over):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 97, **over)).eval()
    with torch.no_grad():   # random init is small: make the transform change the logits clearly
        model.get_output_embeddings().weight.mul_(40.0)
    return model


CASES = [("granite", {"logits_scaling": 4.0}), ("gemma2", {"final_logit_softcapping": 3.0}), ("llama", {})]


@pytest.mark.parametrize("family,over", CASES, ids=[c[0] for c in CASES])
def test_next_token_logits_are_the_models_own(family, over):
    model = tiny_model(family, **over)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        ours, _ = next_token_logits(model, ids, mask, pos)
        raw = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state[:, -1]).float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if over:   # the transform matters here: the bare head is not the model's answer
        assert (raw - ref).abs().max() > 1e-2


@pytest.mark.parametrize("family,over", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_output_head_over_every_position(family, over):
    model = tiny_model(family, **over)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        ours = output_head(model)(model.get_decoder()(input_ids=ids).last_hidden_state).float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
