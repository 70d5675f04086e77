"""Tokenization into compact Arrow columns, once per (data, tokenizer, length).

`tokenize_examples` turns the mapped examples (engine.data) into datasets with
`input_ids` (the smallest unsigned type that holds the vocabulary: uint16 for
vocabularies up to 65,536 entries, else uint32), `length` (uint32) and, per task,
`label` (int32 class index) or `n_masked` (uint32: how many leading tokens are
prompt, whose labels are -100). They are written by a batched `map` (several
processes on a machine with the cores and enough rows) and kept in the data cache
under a fingerprint of the mapped data (source sha256), the tokenizer, the task,
max_seq_len and the chat template, so a second run memory-maps them at once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .arrow_io import StreamWriter, release_pages, stream_batches
from .data import CACHE_VERSION, DataError, DataProgress, Examples, _publish_dir, default_cache_dir, open_arrow

PARALLEL_MIN_ROWS = 100_000      # fewer rows tokenize faster in one process than pools start
CHUNK_ROWS = 250_000             # progress is reported (and map called) per chunk of rows


@dataclass
class Tokenized:
    """Tokenized train and validation sets (memory-mapped Arrow) and the pad id."""

    task: str
    train: Any
    validation: Any
    pad_id: int
    fingerprint: Optional[str] = None


def tokenizer_identity(tok) -> str:
    """A stable digest of what decides token ids: the tokenizer's full definition
    (vocabulary, normalizer, pre-tokenizer, post-processor), its special ids and
    its chat template."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)    # call-time state a previous call leaves behind
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([type(tok).__name__, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id,
                         getattr(tok, "chat_template", None) or ""]).encode())
    return h.hexdigest()[:32]


def id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def format_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


class _Fast:
    """Batch encoding straight on a fast tokenizer's Rust backend (a private copy,
    with or without truncation): the same ids as calling the tokenizer, without
    building a Python encoding object per row."""

    def __init__(self, tok, max_len: Optional[int]):
        from tokenizers import Tokenizer

        self.bt = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        self.bt.no_padding()
        if max_len:
            self.bt.enable_truncation(max_len)
        else:
            self.bt.no_truncation()
        self.fast = hasattr(self.bt, "encode_batch_fast")

    def __call__(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        enc = (self.bt.encode_batch_fast if self.fast else self.bt.encode_batch)(
            texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in enc]


def _batch_encoder(tok, max_len: Optional[int]):
    if getattr(tok, "is_fast", False) and getattr(tok, "backend_tokenizer", None) is not None:
        return _Fast(tok, max_len)
    kw = {"truncation": True, "max_length": max_len} if max_len else {}
    return lambda texts, add_special_tokens: tok(texts, add_special_tokens=add_special_tokens, **kw)["input_ids"]


def _encoder(tok, task: str, max_len: int, label_index: dict):
    """A batched map function: mapped rows -> input_ids, length, label / n_masked."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    chat = bool(getattr(tok, "chat_template", None))
    state = {}

    def encoders():   # built lazily: in each worker process of a parallel map
        if not state:
            state["trunc"], state["plain"] = _batch_encoder(tok, max_len), _batch_encoder(tok, None)
        return state["trunc"], state["plain"]

    def f(batch: dict) -> dict:
        trunc, plain = encoders()
        if task == "classification":
            ids = trunc(batch["text"], True)
            return {"input_ids": ids, "length": [len(x) for x in ids],
                    "label": [label_index[y] for y in batch["label"]]}
        if "prompt" in batch:
            if chat:
                ps = [format_prompt_ids(tok, p) for p in batch["prompt"]]
            else:
                ps = plain([p + "\n" for p in batch["prompt"]], True)
            rs = plain(batch["response"], False)
            ids = [(p + r + eos)[:max_len] for p, r in zip(ps, rs)]
            masked = [min(len(p), len(x)) for p, x in zip(ps, ids)]
        else:
            ids = [(x + eos)[:max_len] for x in plain(batch["text"], True)]
            masked = [0] * len(ids)
        return {"input_ids": ids, "length": [len(x) for x in ids], "n_masked": masked}
    return f


def _features(task: str, vocab: int):
    from datasets import Features, Sequence, Value

    cols = {"input_ids": Sequence(Value(id_dtype(vocab))), "length": Value("uint32")}
    cols.update({"label": Value("int32")} if task == "classification" else {"n_masked": Value("uint32")})
    return Features(cols)


def _workers(rows: int) -> Optional[int]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(cores, 8) if cores >= 4 and rows >= PARALLEL_MIN_ROWS else None


def _as_dataset(rows):
    from datasets import Dataset

    if hasattr(rows, "map") and hasattr(rows, "column_names"):
        return rows
    return Dataset.from_list(list(rows)) if rows else None


class _Progress:
    """Rows done across the train and validation maps: a tqdm bar (rows/s) when
    asked and the caller's callback, at most a few times a second."""

    def __init__(self, total: int, on_progress: Optional[DataProgress], bar: bool):
        self.total, self.done, self.cb, self.last = total, 0, on_progress, 0.0
        self.bar = None
        if bar and total:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="tokenizing", unit="rows", unit_scale=True)

    def add(self, n: int, stage: str, force: bool = False) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if self.cb and (force or now - self.last > 0.5):
            self.last = now
            self.cb(stage, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


ENCODE_ROWS = 1000               # rows per encoder call and per written record batch


def _to_batch(out: dict, schema):
    """An encoder's output (lists) as one record batch of `schema`, built from flat
    numpy arrays (no per-token Python objects kept)."""
    import itertools

    import pyarrow as pa

    ids = out["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    id_type = schema.field("input_ids").type.value_type
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=id_type.to_pandas_dtype(), count=int(offsets[-1]))
    cols = {"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=id_type))}
    for name in schema.names[1:]:
        cols[name] = pa.array(out[name], type=schema.field(name).type)
    return pa.RecordBatch.from_pydict(cols, schema=schema)


def _encode_range(ds, fn, writer, lo: int, hi: int, on_rows=None) -> None:
    """Rows [lo, hi) of `ds`, encoded and written batch by batch (plain reads of the
    source: its pages never stay in this process's RSS)."""
    for b in stream_batches(ds, ENCODE_ROWS, lo, hi):
        writer.write(_to_batch(fn(b.to_pydict()), writer.schema))
        if on_rows:
            on_rows(b.num_rows)


_JOB: dict = {}     # what a forked tokenizing process works on (set before the pool forks)


def _encode_part(span: tuple[int, int]) -> str:
    lo, hi = span
    path = Path(_JOB["dir"]) / f"part-{lo}.arrow"
    with StreamWriter(path, _JOB["features"]) as w:
        _encode_range(_JOB["ds"], _JOB["fn"], w, lo, hi)
    return str(path)


def _tokenize_split(ds, fn, features, prog: _Progress, stage: str, path: Path, procs: Optional[int] = None) -> None:
    """Tokenize `ds` into the Arrow stream file `path`: in this process, or with
    `procs` forked processes (default: as the machine's cores allow) each encoding a
    chunk of CHUNK_ROWS rows into a part file that is appended in order."""
    n, chunk = len(ds), CHUNK_ROWS
    procs = _workers(n) if procs is None else procs
    with StreamWriter(path, features) as w:
        if not procs or procs < 2 or n <= chunk:
            _encode_range(ds, fn, w, 0, n, on_rows=lambda k: prog.add(k, stage))
        else:
            import multiprocessing as mp

            _JOB.update(ds=ds, fn=fn, features=features, dir=str(path.parent))
            try:
                spans = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
                with mp.get_context("fork").Pool(procs) as pool:
                    for (lo, hi), part in zip(spans, pool.imap(_encode_part, spans)):
                        w.append_file(Path(part))
                        os.unlink(part)
                        prog.add(hi - lo, stage)
            finally:
                _JOB.clear()
    prog.add(0, stage, force=True)


def tokens_key(examples: Examples, tok, max_len: int) -> Optional[str]:
    if examples.fingerprint is None:
        return None
    blob = json.dumps({"v": CACHE_VERSION, "examples": examples.fingerprint, "task": examples.task,
                       "tokenizer": tokenizer_identity(tok), "max_len": max_len, "labels": examples.labels})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def tokenize_examples(examples: Examples, tok, max_len: int, *, cache_dir: Optional[Path] = None,
                      on_progress: Optional[DataProgress] = None, progress: bool = False,
                      procs: Optional[int] = None) -> Tokenized:
    """Tokenized train / validation datasets for `examples`, from the cache when the
    same data, tokenizer and max length were tokenized before. `on_progress` gets
    (stage, rows done, rows in all); `progress` also draws a tqdm bar (rows/s)."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    task = examples.task
    train, val = _as_dataset(examples.train), _as_dataset(examples.validation)
    if train is None or len(train) == 0:
        raise DataError("dataset: no training rows")
    key = tokens_key(examples, tok, max_len)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    final = cache / "tokens" / key if key else None
    if final is not None and (final / "meta.json").exists() and (final / "validation.arrow").exists():
        return Tokenized(task, open_arrow(final / "train.arrow"), open_arrow(final / "validation.arrow"), pad_id, key)
    if final is not None:
        cache.mkdir(parents=True, exist_ok=True)
    # the files are written in a temporary folder: the cache entry appears whole or not at all;
    # without a fingerprint (plain rows from a caller) nothing is cached and the folder is
    # removed once they are read into memory
    tmp = Path(tempfile.mkdtemp(prefix=".tokens-", dir=cache if final is not None else None))
    n_val = len(val) if val is not None else 0
    prog = _Progress(len(train) + n_val, on_progress, progress)
    try:
        fn = _encoder(tok, task, max_len, {name: i for i, name in enumerate(examples.labels)})
        feats = _features(task, len(tok))
        out = tmp / "entry"
        _tokenize_split(train, fn, feats, prog, "train", out / "train.arrow", procs)
        if n_val:
            _tokenize_split(val, fn, feats, prog, "validation", out / "validation.arrow", procs)
        else:
            StreamWriter(out / "validation.arrow", feats).close()
        release_pages(train, val)
        if final is None:
            return Tokenized(task, open_arrow(out / "train.arrow", in_memory=True),
                             open_arrow(out / "validation.arrow", in_memory=True), pad_id, None)
        (out / "meta.json").write_text(json.dumps({"rows": [len(train), n_val], "max_len": max_len}))
        _publish_dir(out, final)
    finally:
        prog.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenized(task, open_arrow(final / "train.arrow"), open_arrow(final / "validation.arrow"), pad_id, key)
