"""The estimator's hidden states for GPT-2 against the CPU measure (engine.measure: the
storages autograd saves in one forward of our loop) away from the family battery's one
point (batch 4, seq 32, hidden 32): a wider model and a longer sequence, with GPT-2's
dropouts on (embd_pdrop, attn_pdrop, resid_pdrop on the attention and FFN outputs: CPU
SDPA then runs its math kernel) and off (SDPA's fused kernel keeps the fused c_attn
output once: q, k and v are views of it), and under bf16 autocast with eager attention
(whose softmax runs in the float mask's dtype: fp32 when the embeddings train). GPT-2's
blocks are pre-norm, with Conv1D (addmm) projections and gelu_new, whose elementwise ops
keep four tensors of the FFN width. As in tests/test_encoder_activations.py the walk
models every saved tensor and the measure is exact on CPU: 1% in fp32 (the cells are
within 0.25%), 2% under bf16 (within 0.1%)."""

from __future__ import annotations

import pytest
import torch

from engine.estimator import estimate
from engine.measure import measure_prepared, prepare_for_measure
from engine.models import LoadedModel, load_tokenizer, tiny_config

# GPT2Config keeps the FFN width as n_inner; intermediate_size is what tiny_config sets for the others
WIDE = {"hidden_size": 64, "n_inner": 128, "intermediate_size": 128}
NO_DROPOUT = {**WIDE, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
CELLS = {
    "gpt2-wide-long-dropout": (2, 128, "sdpa", WIDE),
    "gpt2-wide-long-fused-sdpa": (2, 128, "sdpa", NO_DROPOUT),
    "gpt2-wide-eager-dropout-bf16": (2, 96, "eager", WIDE),
}


def model_of(over: dict):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer("tiny-bert")
    cfg = tiny_config("gpt2", vocab_size=len(tok), **over)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval(), tok


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}], ids=["lora", "full"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gpt2_hidden_states_match_the_measure_at_a_second_shape(cell, method):
    batch, seq, attention, over = CELLS[cell]
    dtype = "bf16" if cell.endswith("-bf16") else "fp32"
    model, tok = model_of(over)
    assert model.transformer.h[0].mlp.c_fc.nf == model.config.intermediate_size == 128
    prep = prepare_for_measure("tiny-llama", method, task="causal_lm", precision=dtype,
                               loaded=LoadedModel(model, tok, "tiny-gpt2", 0.0), attention=attention)
    est = estimate(model.config.to_dict(), method, batch_size=batch, seq_len=seq, task="causal_lm",
                   device="cpu", dtype=dtype, attention=attention)
    measured = measure_prepared(prep, batch_size=batch, seq_len=seq, backward=False).rows["hidden_states"]
    ratio = est.rows["hidden_states"] / measured
    bound = 0.01 if dtype == "fp32" else 0.02
    assert abs(ratio - 1) <= bound, (cell, method["name"], est.rows["hidden_states"], measured, est.breakdown)
