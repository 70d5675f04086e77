"""Arrow files read and written in bounded memory.

Why this exists: pyarrow's IPC reader, given a memory-mapped file, faults in every
page of each record batch it reads, and `datasets.Dataset.from_file` reads every
batch when it opens a file. Those are clean pages of a file (the kernel can drop
them at any time), but while they stay mapped they count in the process's RSS, so
opening or scanning a 2M-row table made a run's RSS grow with the number of rows.
So:

- `release_pages(ds)` unmaps the resident pages of a dataset's files from this
  process (madvise MADV_DONTNEED on its read-only file mappings: the data stays
  valid and is faulted in again from the page cache when a row is touched);
- `stream_batches(ds, n)` scans a file-backed dataset through ordinary reads
  (`pa.OSFile`), not the mapping, so a scan holds one batch at a time;
- `StreamWriter` writes record batches to an Arrow stream file (the format
  `Dataset.from_file` memory-maps) with the schema's `datasets` features.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path
from typing import Iterator, Optional

MADV_DONTNEED = 4
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise


def dataset_files(ds) -> list[str]:
    """The Arrow files a `datasets.Dataset` maps (none for an in-memory one)."""
    return [f["filename"] for f in (getattr(ds, "cache_files", None) or []) if f.get("filename")]


def release_pages(*objs) -> int:
    """Drop this process's resident pages of the read-only file mappings of the given
    datasets or paths (see the module docstring). Returns the bytes of address range
    advised; 0 where the platform has no /proc/self/maps."""
    paths = set()
    for o in objs:
        if o is None:
            continue
        if isinstance(o, (str, Path)):
            paths.add(str(Path(o).resolve()))
        else:
            paths.update(str(Path(p).resolve()) for p in dataset_files(o))
    if not paths or not sys.platform.startswith("linux"):
        return 0
    try:
        maps = open("/proc/self/maps").read().splitlines()
    except OSError:
        return 0
    madvise, done = _madvise(), 0
    for line in maps:
        parts = line.split(None, 5)
        # only read-only, non-writable mappings of these files: never private data we wrote
        if len(parts) < 6 or parts[5] not in paths or "w" in parts[1]:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            done += hi - lo
    return done


def _file_stream(path: str):
    """An Arrow stream (or IPC file) reader over plain reads of `path`."""
    import pyarrow as pa

    src = pa.OSFile(path, "rb")
    try:
        return src, pa.ipc.open_stream(src)
    except pa.ArrowInvalid:
        src.close()
        src = pa.OSFile(path, "rb")
        return src, pa.ipc.open_file(src)


def stream_batches(ds, size: int, lo: int = 0, hi: Optional[int] = None) -> Iterator:
    """Rows [lo, hi) of `ds` as `pyarrow.RecordBatch`es of at most `size` rows, in order.
    A dataset backed by one Arrow file with no index mapping is read with plain reads;
    anything else (in memory, selected, several files) through `datasets`' own
    iterator, with the pages it touches released as it goes."""
    import pyarrow as pa

    n = len(ds)
    hi = n if hi is None else min(hi, n)
    files = dataset_files(ds)
    # the whole of one file, as written: no index mapping, and no operation replayed on the
    # mapped table but metadata (a contiguous `select` is a slice; dropped columns a "drop")
    whole = len(files) == 1 and getattr(ds, "_indices", None) is None and \
        all(r[0] == "replace_schema_metadata" for r in (getattr(ds.data, "replays", None) or []))
    if whole:
        src, reader = _file_stream(files[0])
        try:
            batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else \
                (reader.get_batch(i) for i in range(reader.num_record_batches))
            at = 0
            for b in batches:
                m = b.num_rows
                s, e = max(lo, at), min(hi, at + m)
                if s < e:
                    part = b.slice(s - at, e - s)
                    for k in range(0, part.num_rows, size):
                        yield part.slice(k, size)
                at += m
                if at >= hi:
                    break
        finally:
            src.close()
        return
    table = ds.with_format("arrow")
    for k, start in enumerate(range(lo, hi, size)):
        t = table[start:min(hi, start + size)]
        yield from t.to_batches()
        if k % 16 == 15:
            release_pages(ds)
    release_pages(ds)


class StreamWriter:
    """Record batches into an Arrow stream file with `features` (a `datasets.Features`)
    recorded in the schema, so `Dataset.from_file` gives those features back."""

    def __init__(self, path: Path, features):
        import pyarrow as pa

        self.schema = features.arrow_schema
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.rows = 0

    def write(self, batch) -> None:
        import pyarrow as pa

        if isinstance(batch, dict):
            batch = pa.RecordBatch.from_pydict(batch, schema=self.schema)
        elif batch.schema != self.schema:
            batch = pa.RecordBatch.from_arrays([batch.column(n).cast(self.schema.field(n).type)
                                                for n in self.schema.names], schema=self.schema)
        self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def append_file(self, path: Path) -> None:
        """Every batch of another stream file with the same columns, read with plain reads."""
        src, reader = _file_stream(str(path))
        try:
            for b in reader:
                self.write(b)
        finally:
            src.close()

    def close(self) -> None:
        self.writer.close()
        self.sink.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
