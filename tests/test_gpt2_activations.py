"""The estimator's hidden states for GPT-2 against the CPU measure (engine.measure: the
storages autograd saves in one forward of our loop) away from the family battery's one
point (batch 4, seq 32, hidden 32): a wider model and a longer sequence, with GPT-2's
dropouts on (embd_pdrop, attn_pdrop, resid_pdrop on the attention and FFN outputs: CPU
SDPA then runs its math kernel) and off (SDPA's fused kernel keeps the fused c_attn
output once: q, k and v are views of it), and under bf16 autocast with eager attention
(whose softmax runs in the float mask's dtype: fp32 when the embeddings train). GPT-2's
blocks are pre-norm, with Conv1D (addmm) projections and gelu_new, whose elementwise ops
keep four tensors of the FFN width. As in tests/test_encoder_activations.py the walk
models every saved tensor and the measure is exact on CPU: 1% in fp32, 2% under bf16.
The whole model's total is mostly the loss's fp32 logits at the tokenizer's vocabulary,
so one block is also checked on its own (the change from two blocks to three), where
each of the terms above is a few per cent."""

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
METHODS = [{"name": "lora", "r": 4}, {"name": "full"}]


def model_of(over: dict, vocab: int = 0):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer("tiny-bert")
    cfg = tiny_config("gpt2", vocab_size=vocab or len(tok), **over)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval(), tok


def measured_and_estimated(cell: str, method: dict, vocab: int = 0, **over) -> tuple[int, int]:
    batch, seq, attention, base = CELLS[cell]
    dtype = "bf16" if cell.endswith("-bf16") else "fp32"
    model, tok = model_of({**base, **over}, vocab)
    assert model.transformer.h[0].mlp.c_fc.nf == model.config.intermediate_size == 128
    prep = prepare_for_measure("tiny-llama", method, task="causal_lm", precision=dtype,
                               loaded=LoadedModel(model, tok, "tiny-gpt2", 0.0), attention=attention)
    est = estimate(model.config.to_dict(), method, batch_size=batch, seq_len=seq, task="causal_lm",
                   device="cpu", dtype=dtype, attention=attention)
    measured = measure_prepared(prep, batch_size=batch, seq_len=seq, backward=False).rows["hidden_states"]
    return measured, est.rows["hidden_states"]


def bound(cell: str) -> float:
    return 0.02 if cell.endswith("-bf16") else 0.01


@pytest.mark.parametrize("method", METHODS, ids=["lora", "full"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gpt2_hidden_states_match_the_measure_at_a_second_shape(cell, method):
    measured, est = measured_and_estimated(cell, method)
    assert abs(est / measured - 1) <= bound(cell), (cell, method["name"], est, measured)


@pytest.mark.parametrize("method", METHODS, ids=["lora", "full"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_one_gpt2_block_matches_the_measure(cell, method):
    """One more block (three against two, vocabulary 256): what a block keeps, without
    the loss's logits, which are most of the total above (the dropout masks, gelu_new's
    tensors, q/k/v as views of c_attn's output, the eager softmax's dtype are each a few
    per cent of a block)."""
    m2, e2 = measured_and_estimated(cell, method, vocab=256, num_hidden_layers=2)
    m3, e3 = measured_and_estimated(cell, method, vocab=256, num_hidden_layers=3)
    assert abs((e3 - e2) / (m3 - m2) - 1) <= bound(cell), (cell, method["name"], e3 - e2, m3 - m2)


def test_gpt2_embedding_dropout_mask_is_counted_when_the_embeddings_train():
    """The embeddings' dropout (embd_pdrop) keeps its mask only when its input needs a
    gradient (full fine-tuning trains wte / wpe): a share of the total too small for the
    cells above, so it is checked as the change from embd_pdrop 0 to 0.1, which the measure
    sees exactly."""
    hidden = {}
    for p in (0.0, 0.1):
        model, tok = model_of({**NO_DROPOUT, "embd_pdrop": p})
        prep = prepare_for_measure("tiny-llama", {"name": "full"}, task="causal_lm",
                                   loaded=LoadedModel(model, tok, "tiny-gpt2", 0.0), attention="sdpa")
        measured = measure_prepared(prep, batch_size=2, seq_len=64, backward=False).rows["hidden_states"]
        est = estimate(model.config.to_dict(), {"name": "full"}, batch_size=2, seq_len=64, task="causal_lm",
                       device="cpu", dtype="fp32", attention="sdpa").rows["hidden_states"]
        hidden[p] = (measured, est)
    measured_delta, est_delta = hidden[0.1][0] - hidden[0.0][0], hidden[0.1][1] - hidden[0.0][1]
    assert measured_delta == est_delta == 2 * 64 * 64 * 4, (measured_delta, est_delta)
