"""The estimator's hidden states for DeBERTa-v2 and ModernBERT against the CPU measure
(engine.measure: the storages autograd saves in one forward of our loop) away from the
family battery's one point (batch 4, seq 32, hidden 32): a longer sequence than the
relative-position span and the local-attention window, a wider model, DeBERTa-v3's
shared position projections and normed relative embeddings, ModernBERT's eager path
with its dropouts on and mean pooling. The walk models every saved tensor of these
blocks and the measure is exact and deterministic on CPU, so it is held to 1% (the
battery's bound is 10%): what it leaves out is a few int64 id / position buffers (under
0.1% here), and 1% catches a term as small as the first block's missing attention norm. Under bf16
autocast (CPU) the bound is 2% (the worst cell is 0.8% over: DeBERTa-v3 full)."""

from __future__ import annotations

import pytest
import torch

from engine.estimator import estimate
from engine.measure import measure_prepared, prepare_for_measure
from engine.models import LoadedModel, load_tokenizer, tiny_config

WIDE = {"hidden_size": 64, "intermediate_size": 128}
V3 = {**WIDE, "share_att_key": True, "norm_rel_ebd": "layer_norm", "position_buckets": 64,
      "position_biased_input": False, "pos_att_type": ["c2p"]}
LOCAL_GLOBAL = {**WIDE, "num_hidden_layers": 3, "local_attention": 64, "global_attn_every_n_layers": 3,
                "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}
CELLS = {
    # relative span 16 (2·16 = 32 positions) against 128 tokens
    "deberta-wide-long": ("deberta_v2", 2, 128, "eager", WIDE),
    # DeBERTa-v3's shape: positions through query_proj / key_proj, LayerNorm on them, no absolute positions,
    # 2·64 relative positions; c2p only
    "deberta-v3-shared": ("deberta_v2", 2, 96, "eager", V3),
    "deberta-v3-shared-bf16": ("deberta_v2", 2, 96, "eager", V3),
    # three blocks, global every third: two sliding blocks whose window (64: 32 either side) the sequence passes
    "modernbert-local-global": ("modernbert", 2, 128, "sdpa", LOCAL_GLOBAL),
    "modernbert-local-global-bf16": ("modernbert", 2, 128, "sdpa", LOCAL_GLOBAL),
    "modernbert-eager-dropout": ("modernbert", 2, 64, "eager",
                                 {"attention_dropout": 0.1, "mlp_dropout": 0.1, "embedding_dropout": 0.1,
                                  "classifier_dropout": 0.1, "classifier_pooling": "mean"}),
}


def model_of(family: str, over: dict):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer("tiny-bert")
    cfg = tiny_config(family, vocab_size=len(tok), **over)
    if hasattr(cfg, "pooler_hidden_size"):      # DeBERTa sets it from hidden_size when built
        cfg.pooler_hidden_size = cfg.hidden_size
    cfg.pad_token_id, cfg.num_labels = tok.pad_token_id, 2
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").float().eval(), tok


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}], ids=["lora", "full"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_hidden_states_match_the_measure_at_a_second_shape(cell, method):
    family, batch, seq, attention, over = CELLS[cell]
    dtype = "bf16" if cell.endswith("-bf16") else "fp32"
    model, tok = model_of(family, over)
    prep = prepare_for_measure("tiny-llama", method, task="classification", precision=dtype,
                               loaded=LoadedModel(model, tok, f"tiny-{family}", 0.0), attention=attention)
    est = estimate(model.config.to_dict(), method, batch_size=batch, seq_len=seq, task="classification",
                   device="cpu", dtype=dtype, attention=attention)
    measured = measure_prepared(prep, batch_size=batch, seq_len=seq, backward=False).rows["hidden_states"]
    ratio = est.rows["hidden_states"] / measured
    bound = 0.01 if dtype == "fp32" else 0.02
    assert abs(ratio - 1) <= bound, (cell, method["name"], est.rows["hidden_states"], measured, est.breakdown)
