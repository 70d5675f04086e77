"""Datasets: the bundled demos and uploaded CSV / JSONL / Parquet files (read with
Hugging Face `datasets`), column mapping, validation with clear errors, and
tokenization into padded batches."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

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


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file/column and why."""


@dataclass
class Examples:
    """Rows mapped onto the task's columns: text+label, or prompt+response/text."""

    task: str
    train: list[dict]
    validation: list[dict]
    labels: list[str] = field(default_factory=list)   # classification: index -> name

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def read_table(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[dict]:
    """Rows of a CSV / JSONL / Parquet file as dicts, with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset.path: file not found: {p.name}")
    kind = SUPPORTED_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"dataset.path: unsupported file type {p.suffix or '(none)'!r}; use .csv, .jsonl or .parquet")
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"dataset.path: {p.name} is empty")
    if size > max_bytes:
        raise DataError(f"dataset.path: {p.name} is {size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB")
    if kind in ("csv", "json"):
        check_utf8(p)
    else:
        check_parquet(p, max_bytes)
    import shutil
    import tempfile

    import datasets as hf_datasets
    hf_datasets.disable_progress_bars()
    # datasets writes an Arrow copy of the file into its cache (~/.cache/huggingface):
    # keep that copy beside the file (the data dir for uploads) and delete it afterwards
    try:
        cache = tempfile.mkdtemp(prefix=".read-", dir=p.parent)
    except OSError:
        cache = tempfile.mkdtemp(prefix="peft-studio-read-")
    try:
        ds = hf_datasets.load_dataset(kind, data_files=str(p), split="train", keep_in_memory=True,
                                      cache_dir=cache)
        if len(ds) == 0:
            raise DataError(f"dataset.path: {p.name} has no rows")
        return ds.to_list()
    except DataError:
        raise
    except Exception as e:   # datasets raises many types for malformed files
        raise DataError(f"dataset.path: could not read {p.name} as {kind.upper()}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
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


def _require_columns(rows: list[dict], cols: dict[str, Optional[str]], where: str) -> None:
    present = list(rows[0].keys())
    for field_name, col in cols.items():
        if col is None:
            raise DataError(f"dataset.{field_name}: required for this task; columns in {where}: {', '.join(present)}")
        if col not in present:
            raise DataError(f"dataset.{field_name}: column {col!r} not found in {where}; columns: {', '.join(present)}")


def _guess(rows: list[dict], *names: str) -> Optional[str]:
    cols = {c.lower(): c for c in rows[0].keys()}
    for n in names:
        if n in cols:
            return cols[n]
    return None


def map_classification(rows, text_col, label_col, where) -> list[dict]:
    _require_columns(rows, {"text_column": text_col, "label_column": label_col}, where)
    out = []
    for i, r in enumerate(rows):
        t, y = r.get(text_col), r.get(label_col)
        if t is None or (isinstance(t, str) and not t.strip()):
            raise DataError(f"dataset.text_column: row {i + 1} of {where} has an empty {text_col!r}")
        if y is None or (isinstance(y, float) and y != y):
            raise DataError(f"dataset.label_column: row {i + 1} of {where} has no {label_col!r}")
        if isinstance(y, (list, dict)):
            raise DataError(f"dataset.label_column: row {i + 1} of {where}: label must be a string or integer")
        if isinstance(y, float):
            if not y.is_integer():
                raise DataError(f"dataset.label_column: row {i + 1} of {where}: label {y} is not a class "
                                f"(classification needs string or integer labels)")
            y = int(y)
        out.append({"text": str(t), "label": str(y)})
    return out


def map_causal(rows, prompt_col, response_col, text_col, where) -> list[dict]:
    if prompt_col or response_col:
        _require_columns(rows, {"prompt_column": prompt_col, "response_column": response_col}, where)
        out = []
        for i, r in enumerate(rows):
            p, s = r.get(prompt_col), r.get(response_col)
            if p is None or s is None or not str(s).strip():
                raise DataError(f"dataset: row {i + 1} of {where} has an empty prompt or response")
            out.append({"prompt": str(p), "response": str(s)})
        return out
    _require_columns(rows, {"text_column": text_col}, where)
    out = []
    for i, r in enumerate(rows):
        t = r.get(text_col)
        if t is None or not str(t).strip():
            raise DataError(f"dataset.text_column: row {i + 1} of {where} has an empty {text_col!r}")
        out.append({"text": str(t)})
    return out


def load_examples(ds_cfg, task: str, *, max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0,
                  path_resolver=None) -> Examples:
    """Read and map a dataset section of a run config. `path_resolver` maps a
    dataset.path to a real file (the studio maps upload ids into its data dir)."""
    if ds_cfg.name:
        if ds_cfg.name not in BUNDLED_DATASETS:
            raise DataError(f"dataset.name: unknown bundled dataset {ds_cfg.name!r}; "
                            f"choose one of: {', '.join(BUNDLED_DATASETS)}")
        meta = BUNDLED_DATASETS[ds_cfg.name]
        if meta["task"] != task:
            raise DataError(f"dataset.name: {ds_cfg.name!r} is a {meta['task']} dataset, but task is {task!r}")
        train, val = read_bundled(ds_cfg.name, "train"), read_bundled(ds_cfg.name, "validation")
        cols = {k: ds_cfg.model_dump().get(k) or meta.get(k) for k in
                ("text_column", "label_column", "prompt_column", "response_column")}
        where = ds_cfg.name
    else:
        path = path_resolver(ds_cfg.path) if path_resolver else Path(ds_cfg.path)
        rows = read_table(path, max_bytes=max_bytes)
        if ds_cfg.validation_path:
            vpath = path_resolver(ds_cfg.validation_path) if path_resolver else Path(ds_cfg.validation_path)
            train, val = rows, read_table(vpath, max_bytes=max_bytes)
        else:
            rng = random.Random(seed)
            idx = list(range(len(rows)))
            rng.shuffle(idx)
            n_val = int(round(len(rows) * ds_cfg.validation_fraction)) if len(rows) >= 10 else 0
            val = [rows[i] for i in idx[:n_val]]
            train = [rows[i] for i in idx[n_val:]]
        cols = {
            "text_column": ds_cfg.text_column or (_guess(rows, "text", "sentence", "content") if not
                                                  (ds_cfg.prompt_column or ds_cfg.response_column) else None),
            "label_column": ds_cfg.label_column or _guess(rows, "label", "labels", "class", "target"),
            "prompt_column": ds_cfg.prompt_column or (_guess(rows, "prompt", "instruction", "question")
                                                      if task == "causal_lm" and not ds_cfg.text_column else None),
            "response_column": ds_cfg.response_column or (_guess(rows, "response", "output", "answer")
                                                          if task == "causal_lm" and not ds_cfg.text_column else None),
        }
        where = Path(ds_cfg.path).name
    if ds_cfg.max_rows:
        train = train[: ds_cfg.max_rows]
    if task == "classification":
        train = map_classification(train, cols["text_column"], cols["label_column"], where)
        val = map_classification(val, cols["text_column"], cols["label_column"], where) if val else []
        labels = sorted({r["label"] for r in train}, key=_label_sort_key)
        if len(labels) < 2:
            raise DataError(f"dataset.label_column: {cols['label_column']!r} has only one class "
                            f"({labels[0]!r}); classification needs at least two")
        if len(labels) > MAX_CLASSES:
            raise DataError(f"dataset.label_column: {cols['label_column']!r} has {len(labels)} distinct values; "
                            f"at most {MAX_CLASSES} classes are supported (is it the text column?)")
        unseen = sorted({r["label"] for r in val} - set(labels))
        if unseen:
            raise DataError(f"dataset.label_column: validation has labels never seen in training: {unseen[:5]}")
        return Examples(task, train, val, labels)
    train = map_causal(train, cols["prompt_column"], cols["response_column"], cols["text_column"], where)
    val = map_causal(val, cols["prompt_column"], cols["response_column"], cols["text_column"], where) if val else []
    return Examples(task, train, val)


def _label_sort_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


# ---------------------------------------------------------------- tokenization

def format_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def encode_causal(tokenizer, ex: dict, max_len: int) -> dict:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "prompt" in ex:
        p = format_prompt_ids(tokenizer, ex["prompt"])
        r = tokenizer(ex["response"], add_special_tokens=False)["input_ids"] + eos
        ids = (p + r)[:max_len]
        labels = ([-100] * len(p) + r)[:max_len]
    else:
        ids = (tokenizer(ex["text"], add_special_tokens=True)["input_ids"] + eos)[:max_len]
        labels = list(ids)
    return {"input_ids": ids, "labels": labels}


def encode_examples(tokenizer, examples: list[dict], task: str, max_len: int, labels: list[str] = ()) -> list[dict]:
    if task == "classification":
        index = {name: i for i, name in enumerate(labels)}
        enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_len)
        return [{"input_ids": ids, "labels": index[e["label"]]} for ids, e in zip(enc["input_ids"], examples)]
    return [encode_causal(tokenizer, e, max_len) for e in examples]


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    causal = isinstance(batch[0]["labels"], list)
    labels = torch.full((len(batch), n), -100, dtype=torch.long) if causal else \
        torch.tensor([b["labels"] for b in batch], dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        mask[i, :k] = 1
        if causal:
            labels[i, :k] = torch.tensor(b["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchStream:
    """Shuffled batches over epochs, reproducible and resumable from (epoch, index)."""

    def __init__(self, encoded: list[dict], batch_size: int, pad_id: int, seed: int):
        if not encoded:
            raise DataError("dataset: no training rows")
        self.encoded, self.batch_size, self.pad_id, self.seed = encoded, batch_size, pad_id, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.encoded)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    @property
    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.encoded) // self.batch_size))

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._shuffle(self.epoch)
        sel = self._order[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return collate([self.encoded[i] for i in sel], self.pad_id)


def iter_batches(encoded: list[dict], batch_size: int, pad_id: int) -> Iterator[dict]:
    for i in range(0, len(encoded), batch_size):
        yield collate(encoded[i: i + batch_size], pad_id)
