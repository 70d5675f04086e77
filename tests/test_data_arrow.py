"""Arrow-backed data: batches identical to the list-based pipeline it replaced
(tests/fixtures/data_batches.json, captured from that code by
tests/fixtures/make_data_batches.py), the tokenization cache, bounded evaluation
and resuming mid-epoch."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from engine.batching import BatchStream, as_rows, eval_sample, gather
from engine.config import DatasetConfig
from engine.data import load_examples
from engine.models import load_tokenizer
from engine.tokens import tokenize_examples

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "data_batches.json").read_text())
DATASETS = {"sentiment": ("demo-sentiment", "classification"), "instruct": ("demo-instruct", "causal_lm"),
            "instruct-chat": ("demo-instruct", "causal_lm")}


def digest(batch):
    d = hashlib.sha256()
    for k in ("input_ids", "attention_mask", "labels"):
        t = batch[k]
        d.update(k.encode())
        d.update(str(tuple(t.shape)).encode())
        d.update(t.numpy().tobytes())
    return d.hexdigest()[:16]


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer("tiny-bert")


@pytest.mark.parametrize("case", sorted(FIXTURE["cases"]))
def test_batches_identical_to_the_list_pipeline(case, bert_tok, tmp_path):
    import copy
    name, max_len, bs, seed = case.split("/")
    max_len, bs, seed = int(max_len), int(bs), int(seed)
    ds, task = DATASETS[name]
    tok = copy.deepcopy(bert_tok)
    if name.endswith("chat"):
        tok.chat_template = FIXTURE["template"]
    want = FIXTURE["cases"][case]
    ex = load_examples(DatasetConfig(name=ds), task, cache_dir=tmp_path)
    data = tokenize_examples(ex, tok, max_len, cache_dir=tmp_path)
    s = BatchStream(data.train, bs, tok.pad_token_id, seed)
    got = [s.next() for _ in range(len(want["train"]))]
    assert {k: v.tolist() for k, v in got[0].items()} == want["first"]
    assert [digest(b) for b in got] == want["train"]          # crosses into the second epoch
    s2 = BatchStream(data.train, bs, tok.pad_token_id, seed)
    s2.restore({"epoch": 1, "index": 2 * bs})
    assert [digest(s2.next()) for _ in range(3)] == want["resumed_epoch1_index2"]
    rows = as_rows(data.validation)
    assert [digest(gather(rows, np.arange(i, min(i + bs, len(rows))), tok.pad_token_id))
            for i in range(0, len(rows), bs)] == want["eval"]
