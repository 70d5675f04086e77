"""Batches from tokenized Arrow datasets (engine.tokens): padded tensors gathered
straight from the memory-mapped columns, a shuffled, reproducible and resumable
stream over epochs, sequence packing for causal LM, length grouping, and the
reproducible validation sample of bounded evaluation."""

from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .data import DataError

MEGABATCH = 50        # group_by_length sorts windows of this many batches (as Hugging Face's sampler does)


# ---------------------------------------------------------------- plain rows (callers with lists)

def encode_examples(tokenizer, examples: Sequence[dict], task: str, max_len: int, labels: Sequence[str] = ()) \
        -> list[dict]:
    """Rows tokenized into Python lists ({input_ids, labels}): for small callers
    (tests, previews). Training uses engine.tokens.tokenize_examples."""
    from .tokens import format_prompt_ids

    examples = list(examples)
    if task == "classification":
        index = {name: i for i, name in enumerate(labels)}
        enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_len)
        return [{"input_ids": ids, "labels": index[e["label"]]} for ids, e in zip(enc["input_ids"], examples)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ex in examples:
        if "prompt" in ex:
            p = format_prompt_ids(tokenizer, ex["prompt"])
            r = tokenizer(ex["response"], add_special_tokens=False)["input_ids"] + eos
            out.append({"input_ids": (p + r)[:max_len], "labels": ([-100] * len(p) + r)[:max_len]})
        else:
            ids = (tokenizer(ex["text"], add_special_tokens=True)["input_ids"] + eos)[:max_len]
            out.append({"input_ids": ids, "labels": list(ids)})
    return out


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


def iter_batches(encoded: list[dict], batch_size: int, pad_id: int) -> Iterator[dict]:
    for i in range(0, len(encoded), batch_size):
        yield collate(encoded[i: i + batch_size], pad_id)


# ---------------------------------------------------------------- Arrow rows

class ArrowRows:
    """A tokenized split (columns input_ids, length, and label or n_masked) read by
    row index from its Arrow table without converting rows to Python objects."""

    def __init__(self, ds):
        self.ds = ds
        self.table = ds.data.table
        self.map = ds._indices.column(0).to_numpy() if ds._indices is not None else None
        self.causal = "n_masked" in ds.column_names
        self._lengths = None
        self._batches, self._starts = None, None

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            col = self.table.column("length").to_numpy()
            self._lengths = (col[self.map] if self.map is not None else col).astype(np.int64)
        return self._lengths

    def take(self, idx: np.ndarray):
        """Rows `idx` as a small in-memory table, in that order. Each row is taken from
        the record batch that holds it: Arrow's take on a chunked column first joins
        all of its chunks, which would read (and copy) the whole column every batch."""
        import pyarrow as pa

        idx = np.asarray(idx, dtype=np.int64)
        rows = self.map[idx] if self.map is not None else idx
        if self._batches is None:
            self._batches = self.table.to_batches()
            self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        parts, lo = [], 0
        for k, n in zip(*np.unique(chunk[order], return_counts=True)):
            sel = order[lo:lo + n]
            parts.append(self._batches[k].take(pa.array(rows[sel] - self._starts[k])))
            lo += n
        got = pa.Table.from_batches(parts, schema=self.table.schema).combine_chunks()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return got.take(pa.array(back))

    def batch(self, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """Rows `idx`, right-padded: input_ids, attention_mask, labels (as `collate`)."""
        t = self.take(idx)
        lengths = t.column("length").to_numpy().astype(np.int64)
        values = t.column("input_ids").combine_chunks().flatten().to_numpy().astype(np.int64)
        n = int(lengths.max())
        pos = np.arange(n)[None, :]
        mask = pos < lengths[:, None]
        ids = np.full((len(lengths), n), pad_id, dtype=np.int64)
        ids[mask] = values
        if self.causal:
            labels = np.where(mask, ids, -100)
            labels[pos < t.column("n_masked").to_numpy().astype(np.int64)[:, None]] = -100
        else:
            labels = t.column("label").to_numpy().astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                "labels": torch.from_numpy(labels)}

    def packed_batch(self, rows: np.ndarray, counts: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """Packs of consecutive `rows` (`counts` examples each) as one row per pack:
        position ids restart at each example (the model keeps attention inside an
        example: transformers' packed-sequence mask from position ids), the prompt and
        each example's first token carry label -100 (nothing predicts across examples)."""
        t = self.take(rows)
        lengths = t.column("length").to_numpy().astype(np.int64)
        values = t.column("input_ids").combine_chunks().flatten().to_numpy().astype(np.int64)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos_flat = np.arange(len(values)) - starts
        masked = np.repeat(t.column("n_masked").to_numpy().astype(np.int64), lengths)
        lab_flat = np.where((pos_flat < masked) | (pos_flat == 0), -100, values)
        pack_id = np.repeat(np.arange(len(counts)), counts)
        pack_len = np.bincount(pack_id, weights=lengths, minlength=len(counts)).astype(np.int64)
        n = int(pack_len.max())
        mask = np.arange(n)[None, :] < pack_len[:, None]
        ids = np.full((len(counts), n), pad_id, dtype=np.int64)
        ids[mask] = values
        labels = np.full_like(ids, -100)
        labels[mask] = lab_flat
        position = np.zeros_like(ids)
        position[mask] = pos_flat
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                "labels": torch.from_numpy(labels), "position_ids": torch.from_numpy(position)}


def as_rows(data):
    """ArrowRows for a datasets.Dataset; a plain list of encoded dicts stays a list."""
    return data if isinstance(data, (list, ArrowRows)) else ArrowRows(data)


def gather(rows, idx, pad_id: int) -> dict[str, torch.Tensor]:
    if isinstance(rows, list):
        return collate([rows[int(i)] for i in idx], pad_id)
    return rows.batch(np.asarray(idx), pad_id)


PAD_FILL = {"input_ids": None, "attention_mask": 0, "labels": -100, "position_ids": 0}


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch right-padded along the sequence to a multiple of `multiple` (masked, label
    -100): bucketed shapes, so a compiled step (engine.compile) sees a few lengths, not one per
    batch. Classification labels (one per row) are left as they are."""
    n = batch["input_ids"].shape[1]
    extra = -n % multiple
    if not extra:
        return batch
    out = {}
    for k, v in batch.items():
        if v.dim() == 2 and v.shape[1] == n and k in PAD_FILL:
            fill = pad_id if PAD_FILL[k] is None else PAD_FILL[k]
            v = torch.cat([v, v.new_full((v.shape[0], extra), fill)], dim=1)
        out[k] = v
    return out


def pack(lengths: np.ndarray, max_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of examples in a seeded random order: (rows in pack order,
    start of each pack in it, with a final end offset). A pack holds consecutive
    examples of that order while their lengths sum to at most max_len."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    bounds = [0]
    room = 0
    for i, n in enumerate(lengths[order].tolist()):
        if room < n and i > 0:
            bounds.append(i)
            room = max_len
        elif i == 0:
            room = max_len
        room -= n
    bounds.append(len(order))
    return order, np.asarray(bounds, dtype=np.int64)


class BatchStream:
    """Shuffled batches over epochs, reproducible and resumable from (epoch, index).
    The unit shuffled is a row, or with `packing` (causal LM) a pack of rows up to
    `max_len` tokens; `group_by_length` sorts each window of MEGABATCH batches by
    length (longest first) so that a batch pads little."""

    def __init__(self, data, batch_size: int, pad_id: int, seed: int, *, packing: bool = False,
                 max_len: Optional[int] = None, group_by_length: bool = False):
        if data is None or len(data) == 0:
            raise DataError("dataset: no training rows")
        self.rows = as_rows(data)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.packing, self.group_by_length = packing, group_by_length
        if packing:
            if isinstance(self.rows, list) or not self.rows.causal:
                raise DataError("training.packing: needs tokenized causal LM rows")
            self.pack_rows, self.bounds = pack(self.rows.lengths, int(max_len), seed)
        self.epoch, self.index = 0, 0
        self._order = self._shuffle(0)

    @property
    def units(self) -> int:
        return len(self.bounds) - 1 if self.packing else len(self.rows)

    def _shuffle(self, epoch: int) -> np.ndarray:
        order = list(range(self.units))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        order = np.asarray(order, dtype=np.int64)
        if self.group_by_length and not self.packing:
            lengths = self.rows.lengths if not isinstance(self.rows, list) else \
                np.asarray([len(r["input_ids"]) for r in self.rows])
            w = self.batch_size * MEGABATCH
            for lo in range(0, len(order), w):
                win = order[lo:lo + w]
                order[lo:lo + w] = win[np.argsort(-lengths[win], kind="stable")]
        return order

    @property
    def batches_per_epoch(self) -> int:
        return max(1, -(-self.units // self.batch_size))

    @property
    def position(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.index / max(1, self.units)

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
        if not self.packing:
            return gather(self.rows, sel, self.pad_id)
        rows = np.concatenate([self.pack_rows[self.bounds[p]:self.bounds[p + 1]] for p in sel])
        counts = self.bounds[sel + 1] - self.bounds[sel]
        return self.rows.packed_batch(rows, counts, self.pad_id)


class MultiTaskStream:
    """Batches of a multi-task run: each batch is one task's (that task's own
    BatchStream, seeded by the run seed and the task's index), the task drawn with
    probabilities `probs` (engine.tasks.temperature_probs). Draw k depends only on
    (seed, k), so the stream is reproducible and resumes exactly from `state()`.
    `last_task` is the task of the batch `next()` returned last."""

    def __init__(self, datas: Sequence, batch_size: int, pad_id: int, seed: int, probs, **kw):
        self.streams = [BatchStream(d, batch_size, pad_id, seed + 1_009 * i, **kw) for i, d in enumerate(datas)]
        self.probs = np.asarray(probs, dtype=np.float64)
        self.cum = np.cumsum(self.probs)
        self.cum[-1] = 1.0
        self.seed, self.batch_size = seed, batch_size
        self.draws, self.last_task = 0, 0

    def task_of(self, k: int) -> int:
        """The task of draw `k` (0-based)."""
        u = np.random.default_rng([self.seed & (2**64 - 1), 0x7A5C, k]).random()
        return int(np.searchsorted(self.cum, u, side="right"))

    @property
    def units(self) -> int:
        return sum(s.units for s in self.streams)

    @property
    def batches_per_epoch(self) -> int:
        """Batches to see every task's rows once (in expectation the larger tasks take longer)."""
        return sum(s.batches_per_epoch for s in self.streams)

    @property
    def position(self) -> float:
        """Epochs done over all tasks' rows together, fractional."""
        return self.draws * self.batch_size / max(1, self.units)

    def state(self) -> dict:
        return {"draws": self.draws, "tasks": [s.state() for s in self.streams]}

    def restore(self, state: dict) -> None:
        if len(state.get("tasks", [])) != len(self.streams):
            raise DataError(f"checkpoint: data state for {len(state.get('tasks', []))} tasks, the run has "
                            f"{len(self.streams)}")
        self.draws = int(state["draws"])
        for s, st in zip(self.streams, state["tasks"]):
            s.restore(st)

    def next(self) -> dict[str, torch.Tensor]:
        self.last_task = self.task_of(self.draws)
        self.draws += 1
        return self.streams[self.last_task].next()


def eval_sample(n: int, cap: Optional[int], seed: int) -> np.ndarray:
    """Row indices of a bounded evaluation: all `n` rows when within `cap`, else
    `cap` rows drawn without replacement by `seed`, in their original order."""
    if not cap or n <= cap:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
