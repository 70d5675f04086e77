"""Data in bounded memory (engine.arrow_io): tokenizing in several processes gives
the same files as one; scans and opens leave no file pages resident; rows are taken
from their own record batch and come back in the order asked."""

import gc

import numpy as np
import pyarrow as pa
import pytest

import engine.tokens as tokens
from engine.arrow_io import StreamWriter, release_pages, stream_batches
from engine.batching import ArrowRows
from engine.config import DatasetConfig
from engine.data import load_examples, open_arrow
from engine.models import load_tokenizer


def resident_mb(path) -> float:
    """This process's resident bytes (MB) in mappings of `path` (/proc/self/smaps)."""
    kb, cur = 0, None
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and ":" in parts[3]:
            cur = parts[5] if len(parts) > 5 else None
        elif parts and parts[0] == "Rss:" and cur == str(path):
            kb += int(parts[1])
    return kb / 1024


def big_table(path, rows=400_000):
    from datasets import Features, Sequence, Value

    feats = Features({"input_ids": Sequence(Value("uint32")), "length": Value("uint32")})
    rng = np.random.default_rng(0)
    with StreamWriter(path, feats) as w:
        for lo in range(0, rows, 50_000):
            ids = [list(rng.integers(0, 1000, size=12)) for _ in range(50_000)]
            w.write({"input_ids": ids, "length": [12] * 50_000})
    return path


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    return big_table(tmp_path_factory.mktemp("arrow") / "t.arrow")


def test_open_and_scan_leave_no_file_pages_resident(table_file):
    size_mb = table_file.stat().st_size / 2**20
    assert size_mb > 20
    ds = open_arrow(table_file)
    assert resident_mb(table_file) < 0.2 * size_mb, "open_arrow kept the file's pages"
    # a scan by plain reads maps nothing
    n = sum(b.num_rows for b in stream_batches(ds, 10_000))
    assert n == len(ds) == 400_000
    assert resident_mb(table_file) < 0.2 * size_mb
    # reading through the mapping faults pages in; release_pages drops them, and the data stays readable
    def checksum():
        return sum(int(b.column("length").to_numpy().sum()) + int(b.column("input_ids").flatten().to_numpy().sum())
                   for b in ds.data.table.to_batches())
    total = checksum()
    assert resident_mb(table_file) > 0.5 * size_mb
    release_pages(ds)
    assert resident_mb(table_file) < 0.2 * size_mb
    assert total == checksum() > 0


def test_stream_batches_ranges(table_file):
    ds = open_arrow(table_file)
    got = pa.Table.from_batches(list(stream_batches(ds, 7_000, 49_990, 120_011)))
    want = ds.data.table.slice(49_990, 120_011 - 49_990)
    assert got.num_rows == 70_021 and got.equals(want.combine_chunks())
    assert list(stream_batches(ds, 10, 5, 5)) == []
    sel = ds.select(range(100, 50_200))     # an index mapping: datasets' own iterator
    got = pa.Table.from_batches(list(stream_batches(sel, 9_999)))
    assert got.equals(ds.data.table.slice(100, 50_100).combine_chunks())


def test_take_crosses_record_batches_in_the_order_asked(table_file):
    gc.collect()       # earlier tests' mappings of the same file
    ds = open_arrow(table_file)
    rows = ArrowRows(ds)
    assert ds.data.table.column("length").num_chunks > 1
    idx = np.array([399_999, 0, 50_000, 49_999, 123_456, 0, 300_001])
    got = rows.take(idx)
    assert resident_mb(table_file) < 5, "take read more than the batches it needed"
    # Arrow's own take on the chunked table (which joins every chunk) as the reference
    assert got.equals(ds.data.table.take(pa.array(idx)).combine_chunks())
    assert rows.take(np.array([], dtype=np.int64)).num_rows == 0


@pytest.mark.parametrize("task,name", [("classification", "demo-sentiment"), ("causal_lm", "demo-instruct")])
def test_tokenizing_in_several_processes_equals_one(task, name, tmp_path, monkeypatch):
    tok = load_tokenizer("tiny-bert")
    ex = load_examples(DatasetConfig(name=name), task, cache_dir=tmp_path / "c")
    one = tokens.tokenize_examples(ex, tok, 64, cache_dir=tmp_path / "one", procs=1)
    monkeypatch.setattr(tokens, "CHUNK_ROWS", 150)     # several chunks for the pool
    seen = []
    many = tokens.tokenize_examples(ex, tok, 64, cache_dir=tmp_path / "many", procs=2,
                                    on_progress=lambda stage, done, total: seen.append((stage, done, total)))
    for a, b in ((one.train, many.train), (one.validation, many.validation)):
        assert len(a) == len(b) > 0
        assert a.data.table.equals(b.data.table.combine_chunks()) or \
            a.data.table.combine_chunks().equals(b.data.table.combine_chunks())
        assert a.features == b.features
    assert seen[-1][1] == seen[-1][2] == len(ex.train) + len(ex.validation)
