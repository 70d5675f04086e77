"""Sequence packing for causal LM: the same loss as unpacked rows on the same
examples (attention and targets stay inside each example), every example once per
epoch, and length grouping for the unpacked path."""

import numpy as np
import pytest
import torch

from engine.batching import BatchStream, as_rows, gather, pack
from engine.config import DatasetConfig, parse_run_config
from engine.data import load_examples
from engine.models import load_model
from engine.tokens import tokenize_examples
from engine.loss import compute_loss


@pytest.fixture(scope="module")
def llama_and_rows(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    loaded = load_model("tiny-llama", "causal_lm", seed=0)
    ex = load_examples(DatasetConfig(name="demo-instruct"), "causal_lm", cache_dir=cache)
    data = tokenize_examples(ex, loaded.tokenizer, 48, cache_dir=cache)
    return loaded.model.eval(), loaded.tokenizer, data


def test_packed_and_unpacked_give_the_same_loss(llama_and_rows):
    model, tok, data = llama_and_rows
    rows = as_rows(data.train)
    idx = np.arange(9)
    unpacked = gather(rows, idx, tok.pad_token_id)
    packed = rows.packed_batch(idx, np.array([2, 4, 3]), tok.pad_token_id)
    assert packed["input_ids"].shape[0] == 3 and packed["attention_mask"].sum() == unpacked["attention_mask"].sum()
    # the same target tokens: prompts and each example's first token are never targets
    assert int((packed["labels"][:, 1:] != -100).sum()) == int((unpacked["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        a = compute_loss(model, unpacked, "causal_lm").item()
        b = compute_loss(model, packed, "causal_lm").item()
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
        c = compute_loss(model, leaky, "causal_lm").item()
    assert abs(a - b) < 1e-5
    assert abs(a - c) > 1e-3     # attention across examples would change it: the mask is what keeps it equal


def test_packs_cover_every_example_once_within_max_len(llama_and_rows):
    _, tok, data = llama_and_rows
    rows = as_rows(data.train)
    order, bounds = pack(rows.lengths, 48, seed=0)
    assert sorted(order.tolist()) == list(range(len(rows)))
    sums = np.add.reduceat(rows.lengths[order], bounds[:-1])
    assert sums.max() <= 48 and len(bounds) - 1 < len(rows) / 2
    s = BatchStream(data.train, 4, tok.pad_token_id, 0, packing=True, max_len=48)
    seen = 0
    for _ in range(s.batches_per_epoch):
        b = s.next()
        assert b["input_ids"].shape[1] <= 48
        seen += int((b["position_ids"] == 0).logical_and(b["attention_mask"] == 1).sum())
    assert seen == len(rows) and s.epoch == 0


def test_group_by_length_batches_pad_less(llama_and_rows):
    _, tok, data = llama_and_rows
    plain = BatchStream(data.train, 8, tok.pad_token_id, 0)
    grouped = BatchStream(data.train, 8, tok.pad_token_id, 0, group_by_length=True)
    assert sorted(grouped._order.tolist()) == list(range(len(data.train)))

    def padding(s):
        return sum(int((s.next()["attention_mask"] == 0).sum()) for _ in range(s.batches_per_epoch))
    assert padding(grouped) < padding(plain) / 2


def test_packing_config_is_checked():
    base = {"model": "tiny-bert", "dataset": {"name": "demo-sentiment"}, "method": {"name": "lora"}}
    with pytest.raises(ValueError, match="training.packing: only for task causal_lm"):
        parse_run_config({**base, "training": {"packing": True}})
