"""Datasets: the bundled demos and CSV / JSONL / Parquet files or directories of
Parquet shards, read with Hugging Face `datasets` into memory-mapped Arrow tables
(never Python lists of rows), mapped onto the task's columns with clear errors,
and kept in a cache keyed by the source's sha256 so a rerun reads no text again.

Tokenization and its cache: engine.tokens; batches, packing: engine.batching."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

DATA_DIR = Path(__file__).parent / "datasets"
BUNDLED_DATASETS = {
    "demo-sentiment": {"task": "classification", "text_column": "text", "label_column": "label",
                       "description": "1,200 / 300 short reviews, positive or negative"},
    "demo-instruct": {"task": "causal_lm", "prompt_column": "prompt", "response_column": "response",
                      "description": "800 / 200 prompt-response pairs: capitals, sums, opposites, plurals"},
}
SUPPORTED_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
MAX_CLASSES = 1000
CACHE_VERSION = "2"
# (stage, rows done, rows in all) while data is prepared; see format_progress
DataProgress = Callable[[str, int, int], None]


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file/column and why."""


def default_cache_dir() -> Path:
    """Where prepared datasets are kept when the caller names no cache dir:
    STUDIO_DATA_CACHE, else <STUDIO_DATA_DIR>/data-cache."""
    if os.environ.get("STUDIO_DATA_CACHE"):
        return Path(os.environ["STUDIO_DATA_CACHE"]).expanduser()
    from .paths import default_data_dir

    return default_data_dir() / "data-cache"


def format_progress(stage: str, done: int, total: int) -> str:
    """'preparing data: 1.2M / 2.8M rows (tokenizing train)'."""
    def n(x: int) -> str:
        return f"{x / 1e6:.1f}M" if x >= 1_000_000 else f"{x / 1e3:.0f}k" if x >= 10_000 else f"{x:,}"
    return f"preparing data: {n(done)} / {n(total)} rows ({stage})"


@dataclass
class Examples:
    """Rows mapped onto the task's columns (text+label, or prompt+response, or text)
    as memory-mapped `datasets.Dataset`s. `fingerprint` names the mapped data in the
    cache (source sha256 + mapping); callers may also pass plain lists of dicts."""

    task: str
    train: Any
    validation: Any
    labels: list[str] = field(default_factory=list)   # classification: index -> name
    fingerprint: Optional[str] = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)


class Rows:
    """A read-only sequence of row dicts over an Arrow dataset: len, index, slice and
    iteration, without turning the table into Python objects all at once."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.ds.select(range(*i.indices(len(self.ds)))).to_list()
        return self.ds[int(i)]

    def __iter__(self):
        return iter(self.ds)

    def __bool__(self) -> bool:
        return len(self.ds) > 0


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_files(path: str | Path, max_bytes: int) -> tuple[str, list[Path]]:
    """(format, files) of a dataset path: one CSV / JSONL / Parquet file, or a
    directory of Parquet shards (read in row groups, in name order). Sizes are
    checked against `max_bytes` (a directory: its shards together)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".parquet")
        if not files:
            raise DataError(f"dataset.path: directory {p.name} holds no .parquet shards")
        kind = "parquet"
    else:
        if not p.is_file():
            raise DataError(f"dataset.path: file not found: {p.name}")
        kind = SUPPORTED_SUFFIXES.get(p.suffix.lower())
        if kind is None:
            raise DataError(f"dataset.path: unsupported file type {p.suffix or '(none)'!r}; "
                            f"use .csv, .jsonl or .parquet (or a directory of .parquet shards)")
        files = [p]
    sizes = [f.stat().st_size for f in files]
    for f, s in zip(files, sizes):
        if s == 0:
            raise DataError(f"dataset.path: {f.name} is empty")
    if sum(sizes) > max_bytes:
        raise DataError(f"dataset.path: {p.name} is {sum(sizes) / 2**20:.1f} MiB, over the limit of "
                        f"{max_bytes / 2**20:.0f} MiB")
    return kind, files


def read_dataset(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, cache_dir: Optional[Path] = None,
                 checked: bool = False):
    """A file (or directory of Parquet shards) as one memory-mapped `datasets.Dataset`:
    datasets streams the source (CSV in chunks, Parquet by row group) into an Arrow
    file under `cache_dir` (the caller owns and removes it). Content checks (UTF-8,
    Parquet footers and decoded size) run first unless `checked`."""
    kind, files = source_files(path, max_bytes)
    if not checked:
        for f in files:
            if kind in ("csv", "json"):
                check_utf8(f)
            else:
                check_parquet(f, max_bytes)
    import datasets as hf_datasets

    hf_datasets.disable_progress_bars()
    name = Path(path).name
    try:
        ds = hf_datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train",
                                      cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as e:   # datasets raises many types for malformed files
        raise DataError(f"dataset.path: could not read {name} as {kind.upper()}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    if len(ds) == 0:
        raise DataError(f"dataset.path: {name} has no rows")
    from .arrow_io import release_pages

    release_pages(ds)     # datasets read every batch of its new Arrow file: see engine.arrow_io
    return ds


def read_table(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Rows:
    """Rows of a CSV / JSONL / Parquet file (checked, with clear errors) as a sequence
    of dicts over a memory-mapped Arrow copy. The copy's folder is removed at once;
    the mapping keeps its pages readable until the rows are dropped (POSIX)."""
    p = Path(path)
    try:
        cache = tempfile.mkdtemp(prefix=".read-", dir=p.parent)
    except OSError:
        cache = tempfile.mkdtemp(prefix="peft-studio-read-")
    try:
        return Rows(read_dataset(p, max_bytes=max_bytes, cache_dir=Path(cache)))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
# a Parquet file may decompress to far more than its size (a "compression bomb")
PARQUET_MAX_EXPANSION = 10


def check_parquet(p: Path, max_bytes: int) -> None:
    """A real Parquet file (magic at both ends) whose data, uncompressed, stays within
    PARQUET_MAX_EXPANSION times the size limit; read from the footer, not the data."""
    with open(p, "rb") as f:
        head = f.read(4)
        f.seek(-4, 2)
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DataError(f"dataset.path: {p.name} is not a Parquet file")
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(p).metadata
    except Exception as e:
        raise DataError(f"dataset.path: {p.name} is not a readable Parquet file: {type(e).__name__}") from None
    budget = PARQUET_MAX_EXPANSION * max_bytes

    def too_big(total: int):
        return DataError(f"dataset.path: {p.name} holds over {total / 2**20:.0f} MiB of data uncompressed, "
                         f"over {PARQUET_MAX_EXPANSION}x the limit of {max_bytes / 2**20:.0f} MiB")

    # the footer's sizes catch compressed pages; dictionary / run-length encoding can
    # expand further when decoded (4.8 KB of dictionary-encoded text decodes to 20 MB),
    # so decode in small batches and stop as soon as the budget is spent
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if total > budget:
        raise too_big(total)
    total = 0
    try:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=16):
            total += batch.nbytes
            if total > budget:
                raise too_big(total)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"dataset.path: {p.name} is not a readable Parquet file: {type(e).__name__}") from None


BINARY_MAGIC = (b"\x80", b"\x1f\x8b", b"PK", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd", b"PAR1", b"\x93NUMPY")


def check_utf8(p: Path) -> None:
    """UTF-8 text, not a compressed, archived, pickled or Parquet file under a text name."""
    with open(p, "rb") as f:
        head = f.read(8)
        f.seek(0)
        if head.startswith(BINARY_MAGIC) or b"\x00" in head:
            raise DataError(f"dataset.path: {p.name} is a binary file (compressed or pickled?), not text")
        try:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                chunk.decode("utf-8")
        except UnicodeDecodeError:
            # a multi-byte character split at the chunk boundary is not an error; re-check whole file
            try:
                p.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"dataset.path: {p.name} is not UTF-8 text (byte {e.start})") from None


def read_bundled(name: str, split: str) -> list[dict]:
    path = DATA_DIR / f"{name}.{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _require_columns(present: list[str], cols: dict[str, Optional[str]], where: str) -> None:
    for field_name, col in cols.items():
        if col is None:
            raise DataError(f"dataset.{field_name}: required for this task; columns in {where}: {', '.join(present)}")
        if col not in present:
            raise DataError(f"dataset.{field_name}: column {col!r} not found in {where}; columns: {', '.join(present)}")


def _guess(present: list[str], *names: str) -> Optional[str]:
    cols = {c.lower(): c for c in present}
    for n in names:
        if n in cols:
            return cols[n]
    return None


def _first(mask, where_rows: list[int]) -> Optional[int]:
    """The file row (1-based) of the first True in `mask`, or None."""
    import pyarrow.compute as pc

    mask = pc.fill_null(mask, True)
    if not pc.any(mask).as_py():
        return None
    return where_rows[0] + pc.index(mask, True).as_py() + 1


def _blank(col):
    """True where a cell is missing or only whitespace (as text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.or_(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
    return pc.is_null(col)


def _as_text(col):
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(col.type):
        return col
    if pa.types.is_boolean(col.type):     # as Python writes them
        return pc.if_else(col, "True", "False")
    if pa.types.is_floating(col.type):    # a whole float is a class: 1.0 -> "1"
        return pc.cast(pc.cast(col, pa.int64()), pa.string())
    return pc.cast(col, pa.string())


def _mapper(task: str, cols: dict, where: str):
    """A batched `map` function over Arrow batches: from the source's columns to the
    task's (text, label / prompt, response / text), refusing empty cells with the
    row's number in the file. Vectorized with pyarrow.compute."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tc, lc, pcol, rc = cols["text_column"], cols["label_column"], cols["prompt_column"], cols["response_column"]

    def text_of(col, field_name: str, name: str, idx: list[int]):
        row = _first(_blank(col), idx)
        if row is not None:
            raise DataError(f"dataset.{field_name}: row {row} of {where} has an empty {name!r}")
        if not (pa.types.is_string(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                or pa.types.is_boolean(col.type) or pa.types.is_large_string(col.type)):
            raise DataError(f"dataset.{field_name}: {name!r} in {where} holds {col.type}, not text")
        return pc.cast(col, pa.string()) if not pa.types.is_boolean(col.type) else _as_text(col)

    def f(batch: pa.Table, idx: list[int]) -> pa.Table:
        if task == "classification":
            text = text_of(batch.column(tc), "text_column", tc, idx)
            y = batch.column(lc)
            bad = pc.is_null(y)
            if pa.types.is_floating(y.type):
                bad = pc.or_(bad, pc.is_nan(y))
            row = _first(bad, idx)
            if row is not None:
                raise DataError(f"dataset.label_column: row {row} of {where} has no {lc!r}")
            if not (pa.types.is_string(y.type) or pa.types.is_integer(y.type) or pa.types.is_floating(y.type)
                    or pa.types.is_boolean(y.type) or pa.types.is_large_string(y.type)):
                raise DataError(f"dataset.label_column: row {idx[0] + 1} of {where}: label must be a string or "
                                f"integer")
            if pa.types.is_floating(y.type):
                row = _first(pc.not_equal(y, pc.floor(y)), idx)
                if row is not None:
                    v = batch.column(lc)[row - idx[0] - 1].as_py()
                    raise DataError(f"dataset.label_column: row {row} of {where}: label {v} is not a class "
                                    f"(classification needs string or integer labels)")
            return pa.table({"text": text, "label": _as_text(pc.cast(y, pa.string()) if
                                                                 pa.types.is_large_string(y.type) else y)})
        if pcol or rc:
            p, r = batch.column(pcol), batch.column(rc)
            row = _first(pc.or_(pc.is_null(p), _blank(r)), idx)
            if row is not None:
                raise DataError(f"dataset: row {row} of {where} has an empty prompt or response")
            return pa.table({"prompt": _as_text(pc.cast(p, pa.string()) if pa.types.is_large_string(p.type) else p),
                             "response": _as_text(pc.cast(r, pa.string()) if pa.types.is_large_string(r.type)
                                                  else r)})
        return pa.table({"text": text_of(batch.column(tc), "text_column", tc, idx)})
    return f


def _resolve_columns(ds_cfg, task: str, present: list[str], meta: Optional[dict]) -> dict:
    if meta is not None:   # a bundled dataset: its columns unless the config names others
        return {k: getattr(ds_cfg, k) or meta.get(k) for k in
                ("text_column", "label_column", "prompt_column", "response_column")}
    causal_pr = task == "causal_lm" and not ds_cfg.text_column
    return {
        "text_column": ds_cfg.text_column or (_guess(present, "text", "sentence", "content") if not
                                              (ds_cfg.prompt_column or ds_cfg.response_column) else None),
        "label_column": ds_cfg.label_column or _guess(present, "label", "labels", "class", "target"),
        "prompt_column": ds_cfg.prompt_column or (_guess(present, "prompt", "instruction", "question")
                                                  if causal_pr else None),
        "response_column": ds_cfg.response_column or (_guess(present, "response", "output", "answer")
                                                      if causal_pr else None),
    }


def _map_rows(ds, task: str, cols: dict, where: str, out: Path):
    """The source's rows mapped onto the task's columns (engine.data._mapper), written
    to the Arrow stream file `out` and memory-mapped."""
    present = ds.column_names
    if task == "classification":
        _require_columns(present, {"text_column": cols["text_column"], "label_column": cols["label_column"]}, where)
    elif cols["prompt_column"] or cols["response_column"]:
        _require_columns(present, {"prompt_column": cols["prompt_column"],
                                   "response_column": cols["response_column"]}, where)
    else:
        _require_columns(present, {"text_column": cols["text_column"]}, where)
    from datasets import Features, Value

    from .arrow_io import StreamWriter, stream_batches

    names = (["text", "label"] if task == "classification" else
             ["prompt", "response"] if (cols["prompt_column"] or cols["response_column"]) else ["text"])
    import pyarrow as pa

    f, at = _mapper(task, cols, where), 0
    # a scan by plain reads, one block of rows at a time (engine.arrow_io)
    with StreamWriter(out, Features({n: Value("string") for n in names})) as w:
        for b in stream_batches(ds, 50_000):
            for rb in f(pa.Table.from_batches([b]), range(at, at + b.num_rows)).to_batches():
                w.write(rb)
            at += b.num_rows
    return open_arrow(out)


def write_arrow(ds, path: Path, rows: Optional[np.ndarray] = None) -> None:
    """Rows `rows` (default: all) of a dataset as one Arrow stream file (the format
    `datasets.Dataset.from_file` memory-maps), copied by pyarrow in blocks."""
    import pyarrow as pa

    from .arrow_io import release_pages

    table = ds.data.table
    base = ds._indices.column(0).to_numpy() if ds._indices is not None else None
    if rows is None:
        rows = base if base is not None else None
    elif base is not None:
        rows = base[rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        if rows is None:
            for batch in table.to_batches(max_chunksize=65_536):
                w.write_batch(batch)
        else:
            for k, lo in enumerate(range(0, len(rows), 65_536)):
                w.write_table(table.take(pa.array(rows[lo:lo + 65_536])))
                if k % 8 == 7:
                    release_pages(ds)
    release_pages(ds)


def open_arrow(path: Path, in_memory: bool = False):
    """A memory-mapped dataset over an Arrow stream file written by write_arrow (or
    read into memory). Opening reads every record batch, which faults in all of the
    file's pages: they are released at once (engine.arrow_io), so the process holds
    only the pages of the rows it later touches."""
    from datasets import Dataset

    from .arrow_io import release_pages

    ds = Dataset.from_file(str(path), in_memory=in_memory)
    if not in_memory:
        release_pages(ds)
    return ds


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place; another process may have won the race."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def examples_key(ds_cfg, task: str, seed: int, shas: list[str]) -> str:
    conf = ds_cfg.model_dump()
    conf.pop("path", None)
    conf.pop("validation_path", None)
    conf.pop("tasks", None)          # a multi-task run's sections are keyed one by one, like single datasets
    conf.pop("temperature", None)
    random_split = not ds_cfg.name and not ds_cfg.validation_path
    blob = json.dumps({"v": CACHE_VERSION, "task": task, "dataset": conf, "files": shas,
                       "seed": seed if random_split else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_examples(ds_cfg, task: str, *, max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0,
                  path_resolver=None, cache_dir: Optional[Path] = None,
                  on_progress: Optional[DataProgress] = None) -> Examples:
    """Read and map a dataset section of a run config into memory-mapped Arrow
    datasets, cached under `cache_dir` (default: default_cache_dir()) by the sha256
    of the source file(s) and the mapping, so a rerun reads only the cache.
    `path_resolver` maps a dataset.path to a real file (the studio maps upload ids)."""
    import random

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    meta = None
    if ds_cfg.name:
        if ds_cfg.name not in BUNDLED_DATASETS:
            raise DataError(f"dataset.name: unknown bundled dataset {ds_cfg.name!r}; "
                            f"choose one of: {', '.join(BUNDLED_DATASETS)}")
        meta = BUNDLED_DATASETS[ds_cfg.name]
        if meta["task"] != task:
            raise DataError(f"dataset.name: {ds_cfg.name!r} is a {meta['task']} dataset, but task is {task!r}")
        path = DATA_DIR / f"{ds_cfg.name}.train.jsonl"
        vpath = DATA_DIR / f"{ds_cfg.name}.validation.jsonl"
        where = ds_cfg.name
    else:
        path = path_resolver(ds_cfg.path) if path_resolver else Path(ds_cfg.path)
        vpath = None
        if ds_cfg.validation_path:
            vpath = path_resolver(ds_cfg.validation_path) if path_resolver else Path(ds_cfg.validation_path)
        where = Path(ds_cfg.path).name
    shas = []
    for src in (path, vpath):
        if src is not None:
            _, files = source_files(src, max_bytes)
            shas.append([sha256_of(f) for f in files])
    key = examples_key(ds_cfg, task, seed, shas)
    final = cache / "examples" / key
    if (final / "meta.json").exists() and (final / "validation.arrow").exists():
        info = json.loads((final / "meta.json").read_text())
        return Examples(task, open_arrow(final / "train.arrow"), open_arrow(final / "validation.arrow"),
                        info["labels"], key)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".examples-", dir=cache))
    try:
        if on_progress:
            on_progress("reading", 0, 0)
        raw = read_dataset(path, max_bytes=max_bytes, cache_dir=tmp / "hf")
        cols = _resolve_columns(ds_cfg, task, raw.column_names, meta)
        mapped = _map_rows(raw, task, cols, where, tmp / "mapped-train.arrow")
        train_rows = val_rows = None
        if vpath is not None:
            train = mapped
            val = _map_rows(read_dataset(vpath, max_bytes=max_bytes, cache_dir=tmp / "hf"), task, cols,
                            vpath.name if meta is None else where, tmp / "mapped-validation.arrow")
        else:
            n = len(mapped)
            idx = list(range(n))
            random.Random(seed).shuffle(idx)    # the split of earlier versions, row for row
            order = np.asarray(idx, dtype=np.int64)
            del idx
            n_val = int(round(n * ds_cfg.validation_fraction)) if n >= 10 else 0
            val_rows, train_rows = order[:n_val], order[n_val:]
            val = train = mapped
        if ds_cfg.max_rows and ds_cfg.max_rows < (len(train) if train_rows is None else len(train_rows)):
            train_rows = (np.arange(ds_cfg.max_rows) if train_rows is None else train_rows[:ds_cfg.max_rows])
        out = tmp / "entry"
        write_arrow(train, out / "train.arrow", train_rows)
        write_arrow(val, out / "validation.arrow", val_rows)
        del raw, mapped, train, val
        train, val = open_arrow(out / "train.arrow"), open_arrow(out / "validation.arrow")
        labels: list[str] = []
        if task == "classification":
            labels = sorted(train.unique("label"), key=_label_sort_key)
            if len(labels) < 2:
                raise DataError(f"dataset.label_column: {cols['label_column']!r} has only one class "
                                f"({labels[0]!r}); classification needs at least two")
            if len(labels) > MAX_CLASSES:
                raise DataError(f"dataset.label_column: {cols['label_column']!r} has {len(labels)} distinct "
                                f"values; at most {MAX_CLASSES} classes are supported (is it the text column?)")
            unseen = sorted(set(val.unique("label")) - set(labels)) if len(val) else []
            if unseen:
                raise DataError(f"dataset.label_column: validation has labels never seen in training: {unseen[:5]}")
        (out / "meta.json").write_text(json.dumps({"labels": labels, "where": where, "columns": cols,
                                                   "rows": [len(train), len(val)]}))
        del train, val
        _publish_dir(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((final / "meta.json").read_text())
    return Examples(task, open_arrow(final / "train.arrow"), open_arrow(final / "validation.arrow"),
                    info["labels"], key)


def _label_sort_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)
