"""Bundled datasets and uploads (CSV, JSONL, Parquet) with clear errors."""

import json

import pytest

from engine.config import DatasetConfig
from engine.data import DataError, load_examples, read_bundled


def test_bundled_datasets_have_validation_splits():
    for name, n_train, n_val in (("demo-sentiment", 1200, 300), ("demo-instruct", 800, 200)):
        assert len(read_bundled(name, "train")) == n_train
        assert len(read_bundled(name, "validation")) == n_val
    ex = load_examples(DatasetConfig(name="demo-sentiment"), "classification")
    assert ex.labels == ["negative", "positive"]
    counts = [sum(r["label"] == lab for r in ex.validation) for lab in ex.labels]
    assert max(counts) / sum(counts) < 0.6   # a majority-class baseline stays near 50 %


def write(tmp_path, name, rows=None, text=None):
    p = tmp_path / name
    if text is not None:
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    elif name.endswith(".csv"):
        import csv
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".parquet"):
        import pandas as pd
        pd.DataFrame(rows).to_parquet(p)
    return p


ROWS = [{"sentence": f"text number {i}", "y": i % 3} for i in range(30)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_uploads_in_every_format_with_column_mapping(tmp_path, suffix):
    p = write(tmp_path, "d" + suffix, ROWS)
    ex = load_examples(DatasetConfig(path=str(p), text_column="sentence", label_column="y"), "classification")
    assert ex.labels == ["0", "1", "2"]
    assert len(ex.train) + len(ex.validation) == 30 and len(ex.validation) == 3


def test_causal_lm_prompt_response_and_text_columns(tmp_path):
    p = write(tmp_path, "c.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(12)])
    ex = load_examples(DatasetConfig(path=str(p), prompt_column="q", response_column="a"), "causal_lm")
    assert ex.train[0].keys() == {"prompt", "response"}
    p2 = write(tmp_path, "t.csv", [{"text": f"line {i}"} for i in range(12)])
    ex2 = load_examples(DatasetConfig(path=str(p2)), "causal_lm")
    assert ex2.train[0].keys() == {"text"}


@pytest.mark.parametrize("name,content,cfg,message", [
    ("missing.csv", None, {"text_column": "sentence", "label_column": "nope"}, "label_column: column .nope. not found"),
    ("empty.csv", "", {}, "is empty"),
    ("latin1.csv", b"text,label\ncaf\xe9,1\nthe,0\n", {}, "not UTF-8"),
    ("one.csv", "text,label\na,1\nb,1\nc,1\n", {}, "only one class"),
    ("floaty.csv", "text,label\na,0.5\nb,1.5\n", {}, "is not a class"),
    ("bad.jsonl", "{not json\n", {}, "could not read"),
    ("data.txt", "hello", {}, "unsupported file type"),
    ("pickle.csv", b"\x80\x04\x95\x00", {}, "binary file"),
])
def test_bad_data_gets_a_clear_error(tmp_path, name, content, cfg, message):
    p = write(tmp_path, name, ROWS if content is None else None, content)
    with pytest.raises(DataError, match=message):
        load_examples(DatasetConfig(path=str(p), **cfg), "classification")


def test_size_limit(tmp_path):
    p = write(tmp_path, "big.csv", ROWS)
    with pytest.raises(DataError, match="over the limit"):
        load_examples(DatasetConfig(path=str(p), text_column="sentence", label_column="y"), "classification",
                      max_bytes=10)


def test_task_mismatch_for_bundled_dataset():
    with pytest.raises(DataError, match="causal_lm dataset"):
        load_examples(DatasetConfig(name="demo-instruct"), "classification")


def test_directory_of_parquet_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(3):   # small row groups: read group by group
        pq.write_table(pa.table({"text": [f"shard {k} row {i}" for i in range(20)], "label": [i % 2 for i in range(20)]}),
                       d / f"part-{k}.parquet", row_group_size=5)
    (d / "notes.txt").write_text("ignored")
    ex = load_examples(DatasetConfig(path=str(d), validation_fraction=0.0), "classification", cache_dir=tmp_path / "c")
    assert len(ex.train) == 60 and ex.labels == ["0", "1"]
    assert sorted(r["text"] for r in ex.train)[:2] == ["shard 0 row 0", "shard 0 row 1"]
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .parquet shards"):
        load_examples(DatasetConfig(path=str(empty)), "classification")
