"""The playground: one prompt through a base model and any number of finished runs'
adapters on it, side by side.

- Bases are loaded once and kept in an LRU cache (`CACHE`) bounded by memory
  (`STUDIO_PLAYGROUND_MEMORY_GB`, default 8: the bytes of each base's tensors plus
  its attached adapters' own tensors) and by count (`CACHE_SIZE`). Loading a base
  evicts the least recently used ones until it fits; a base bigger than the whole
  limit is refused with the figures.
- Runs attach to their base through `engine.adapter_bank.AdapterBank` (views that
  share the base's weights). Runs trained on different bases (model, task,
  labels, or the seed of a randomly initialised test model) are refused together.
- Causal LM: token-by-token decoding with a KV cache, one decoder per column,
  interleaved, so every column fills at once. Temperature 0 is greedy; otherwise
  temperature-scaled sampling restricted to the nucleus of top-p probability mass
  (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
  arXiv:1904.09751) from a per-column generator seeded with `seed` (repeatable).
- Classification: each column's label probabilities.

One computation at a time per base (its bank's lock, taken per round of tokens):
views share the base's tensors, and the CPU has no room for two anyway.
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from workers.settings import Settings

from . import artifacts, service

MAX_NEW_TOKENS = 512          # the most new tokens a request may ask for
DEFAULT_NEW_TOKENS = 48
MAX_INPUT_CHARS = 4000
MAX_RUNS = 8                  # runs beside the base in one request
CACHE_SIZE = 4                # bases kept at most (and within the memory limit)
MEMORY_ENV = "STUDIO_PLAYGROUND_MEMORY_GB"
DEFAULT_MEMORY_GB = 8.0
GB = 1e9


class Refused(ValueError):
    """The chosen runs cannot be served together (HTTP 409); the message names the field."""


class BadInput(ValueError):
    """A prompt or a generation setting out of range (HTTP 422); the message names the field."""


# ---- inputs --------------------------------------------------------------------------------------

@dataclass
class GenSettings:
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def check_prompt(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadInput("prompt: type some text first")
    if len(text) > MAX_INPUT_CHARS:
        raise BadInput(f"prompt: {len(text)} characters; at most {MAX_INPUT_CHARS}")
    return text.strip()


def check_settings(max_new_tokens: Any = DEFAULT_NEW_TOKENS, temperature: Any = 0.0, top_p: Any = 1.0,
                   seed: Any = None) -> GenSettings:
    def number(name, v, lo, hi, integer=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and v != int(v)):
            raise BadInput(f"{name}: must be {'an integer' if integer else 'a number'}, not {v!r}")
        if not math.isfinite(v) or not lo <= v <= hi:
            raise BadInput(f"{name}: {v} is out of range {lo}..{hi}")
        return int(v) if integer else float(v)
    n = number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True)
    t = number("temperature", temperature, 0.0, 5.0)
    p = number("top_p", top_p, 0.0, 1.0)
    if p == 0:
        raise BadInput("top_p: must be above 0 (1 keeps every token)")
    s = secrets.randbelow(2**31) if seed is None else number("seed", seed, 0, 2**31 - 1, integer=True)
    return GenSettings(n, t, p, s)


def memory_limit() -> int:
    raw = os.environ.get(MEMORY_ENV, "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_MEMORY_GB
    except ValueError:
        gb = float("nan")
    if not math.isfinite(gb) or gb <= 0:
        raise Refused(f"{MEMORY_ENV}: must be a positive number of GB, not {raw!r}")
    return int(gb * GB)


# ---- which runs, on which base ------------------------------------------------------------------------

@dataclass
class Chosen:
    run: dict
    cfg: Any                  # engine.config.RunConfig
    labels: list[str] = field(default_factory=list)

    @property
    def id(self) -> int:
        return int(self.run["id"])

    @property
    def view_key(self) -> tuple:
        return (self.id, self.run["adapter"]["sha256"])


def seed_matters(model: str) -> bool:
    """A randomly initialised test model: its weights are drawn from the run's seed."""
    from engine.models import TINY_MODELS

    return model in TINY_MODELS


def base_key(c: Chosen) -> tuple:
    cfg = c.cfg
    return (cfg.model, cfg.task, tuple(c.labels) if cfg.task == "classification" else (),
            cfg.training.seed if seed_matters(cfg.model) else None)


def choose(runs: list[dict]) -> list[Chosen]:
    """The runs as Chosen, refused (Refused) unless every one is finished with an
    adapter and all share one model and task."""
    from engine.config import parse_run_config

    if not runs:
        raise BadInput("run_ids: choose at least one finished run")
    if len(runs) > MAX_RUNS:
        raise BadInput(f"run_ids: {len(runs)} runs; at most {MAX_RUNS} at once")
    out = []
    for run in runs:
        if run["status"] != "succeeded" or not run.get("adapter"):
            raise Refused(f"run_ids: run {run['id']} is {run['status']}; only succeeded runs have an adapter to try")
        cfg = parse_run_config(run["config"])
        if cfg.dataset.tasks and cfg.task == "classification":
            raise Refused(f"run_ids: run {run['id']} is a multi-task classification run; the playground shows "
                          f"one head per run")
        out.append(Chosen(run, cfg))
    first = out[0]
    for c in out[1:]:
        if c.cfg.model != first.cfg.model:
            raise Refused(f"run_ids: run {c.id} was trained on {c.cfg.model}, not {first.cfg.model}, the base of "
                          f"run {first.id}; choose runs of one base model")
        if c.cfg.task != first.cfg.task:
            raise Refused(f"run_ids: run {c.id} is a {c.cfg.task} run, not {first.cfg.task} like run {first.id}; "
                          f"choose runs of one task")
        if seed_matters(c.cfg.model) and c.cfg.training.seed != first.cfg.training.seed:
            raise Refused(f"run_ids: run {c.id}'s base {c.cfg.model} is a random test model drawn with seed "
                          f"{c.cfg.training.seed}, not {first.cfg.training.seed} like run {first.id}; "
                          f"choose runs of one base")
    return out


def check_labels(chosen: list[Chosen]) -> None:
    first = chosen[0]
    for c in chosen[1:]:
        if c.cfg.task == "classification" and c.labels != first.labels:
            raise Refused(f"run_ids: run {c.id} classifies into {c.labels}, not {first.labels} like run {first.id}; "
                          f"choose runs with the same labels")


# ---- the base cache ---------------------------------------------------------------------------------

class BaseCache:
    """Loaded bases (each an AdapterBank with its attached runs) by base key, least
    recently used first; within `memory_limit()` bytes and `size` bases."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._items: "OrderedDict[tuple, Any]" = OrderedDict()
        self._lock = threading.RLock()

    def keys(self) -> list:
        with self._lock:
            return list(self._items)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(b.total_bytes for b in self._items.values())

    def drop(self, key) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def bank(self, key: tuple, load) -> Any:
        """The bank of base `key`, loaded by `load()` -> (model, tokenizer) if absent."""
        from engine.adapter_bank import AdapterBank

        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            limit = memory_limit()
            model, tokenizer = load()
            bank = AdapterBank(model, tokenizer, key[1])
            if bank.base_bytes > limit:
                raise Refused(f"run_ids: the base model {key[0]} takes {bank.base_bytes / GB:.2f} GB, more than the "
                              f"playground's limit of {limit / GB:.2f} GB ({MEMORY_ENV})")
            while self._items and (len(self._items) >= self.size or self.used_bytes() + bank.base_bytes > limit):
                self._items.popitem(last=False)
            self._items[key] = bank
            return bank

    def fit(self, key: tuple, keep: set) -> None:
        """After attaching to base `key`: evict its views not in `keep`, then other
        bases (least recently used first), until everything fits the limit."""
        with self._lock:
            limit = memory_limit()
            bank = self._items[key]
            spare = [k for k in bank.keys() if k not in keep]
            while self.used_bytes() > limit and spare:
                bank.detach(spare.pop(0))
            others = [k for k in self._items if k != key]
            while self.used_bytes() > limit and others:
                self._items.pop(others.pop(0))
            if self.used_bytes() > limit:
                need = bank.total_bytes
                for k in [k for k in bank.keys() if k in keep]:
                    bank.detach(k)
                raise Refused(f"run_ids: these runs with their base take {need / GB:.2f} GB, more than the "
                              f"playground's limit of {limit / GB:.2f} GB ({MEMORY_ENV})")


CACHE = BaseCache()


# ---- a session: the base and the chosen runs, attached ---------------------------------------------------

@dataclass
class Column:
    run_id: Optional[int]     # None: the base model
    title: str
    model: Any


@dataclass
class Session:
    key: tuple
    bank: Any
    chosen: list[Chosen]
    columns: list[Column]

    @property
    def task(self) -> str:
        return self.key[1]

    @property
    def tokenizer(self):
        return self.bank.tokenizer


def column_title(run: dict) -> str:
    return f"#{run['id']} {run['name']} ({run['method']})"


def open_session(settings: Settings, runs: list[dict]) -> Session:
    """Load (or reuse) the base of `runs` (dicts from service.get_run, already
    checked visible to the caller) and attach each run's adapter to it."""
    from engine.adapter_bank import BankError
    from engine.adapters import adapter_labels

    chosen = choose(runs)
    with tempfile.TemporaryDirectory(prefix="playground-") as tmp:
        dirs: dict[tuple, Path] = {}
        for c in chosen:
            d = Path(tmp) / str(c.id)
            dirs[c.view_key] = artifacts.adapter_dir_for(settings, c.id, d)
            c.labels = adapter_labels(d)
        check_labels(chosen)
        key = base_key(chosen[0])

        def load():
            try:
                loaded = artifacts.load_base(settings, chosen[0].cfg, chosen[0].labels)
            except ValueError as e:    # engine.models.ModelLoadError: the base cannot be loaded here
                raise Refused(f"run_ids: run {chosen[0].id}: {e}") from None
            return loaded.model, loaded.tokenizer
        bank = CACHE.bank(key, load)
        try:
            for c in chosen:
                if c.view_key not in bank:
                    try:
                        bank.attach(c.view_key, c.cfg, dirs[c.view_key])
                    except (Refused, BadInput):
                        raise
                    except ValueError as e:   # an adapter that does not fit its base (engine.adapters)
                        raise Refused(f"run_ids: run {c.id}: {e}") from None
            CACHE.fit(key, {c.view_key for c in chosen})
            cols = [Column(None, f"base ({key[0]})", bank.base)]
            cols += [Column(c.id, column_title(c.run), bank.view(c.view_key)) for c in chosen]
        except BankError:
            CACHE.drop(key)
            raise
    return Session(key, bank, chosen, cols)


# ---- classification --------------------------------------------------------------------------------

def classify(model, tokenizer, text: str, labels: list[str], max_len: int) -> dict[str, float]:
    import torch

    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_len)
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    probs = torch.softmax(logits, -1).tolist()
    names = labels or [str(i) for i in range(len(probs))]
    return {names[i] if i < len(names) else str(i): float(p) for i, p in enumerate(probs)}


def classify_many(session: Session, prompt: str) -> list[dict]:
    """[{run_id, title, probabilities, output (the top label)}] for the base and each run."""
    labels = session.chosen[0].labels
    max_len = max(c.cfg.training.max_seq_len for c in session.chosen)
    out = []
    with session.bank.lock:
        for col in session.columns:
            probs = classify(col.model, session.tokenizer, prompt, labels, max_len)
            out.append({"run_id": col.run_id, "title": col.title, "probabilities": probs,
                        "output": max(probs, key=probs.get)})
    return out


# ---- generation ------------------------------------------------------------------------------------

def prompt_ids(tokenizer, prompt: str):
    """The prompt as a [1, n] tensor of token ids, formatted as training formats
    prompts (engine.tokens.format_prompt_ids: the chat template when there is one)."""
    import torch

    from engine.tokens import format_prompt_ids

    return torch.tensor([format_prompt_ids(tokenizer, prompt)])


def stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids if i is not None}


def pick_token(logits, gen: GenSettings, generator) -> int:
    """Greedy at temperature 0; else a draw from the temperature-scaled nucleus (top-p)."""
    import torch

    logits = logits.float()
    if gen.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / gen.temperature, -1)
    if gen.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p            # mass of the tokens ranked above each one
        sorted_p[before >= gen.top_p] = 0.0                 # the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class Decoder:
    """One column's generation, a token per `step()`, with the model's KV cache.
    `step()` returns the new text (possibly '' while a character is incomplete) and
    sets `done`; the pieces concatenate to `text`."""

    def __init__(self, model, tokenizer, ids, gen: GenSettings):
        import torch

        self.model, self.tokenizer, self.gen = model, tokenizer, gen
        self.prompt = ids
        self.mask = torch.ones_like(ids)
        self.generator = torch.Generator().manual_seed(gen.seed)
        self.stop = stop_ids(model, tokenizer)
        self.new: list[int] = []
        self.past = None
        self.text = ""
        self.done = False
        self.seconds = 0.0

    def _flush(self, final: bool) -> str:
        full = self.tokenizer.decode(self.new, skip_special_tokens=True)
        if not full.startswith(self.text) or (not final and full.endswith("\ufffd")):
            return ""
        piece, self.text = full[len(self.text):], full
        return piece

    def step(self) -> str:
        import torch

        if self.done:
            return ""
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.past is None:
                out = self.model(input_ids=self.prompt, attention_mask=self.mask, use_cache=True, logits_to_keep=1)
            else:
                last = torch.tensor([[self.new[-1]]])
                out = self.model(input_ids=last, attention_mask=self.mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        tok = pick_token(out.logits[0, -1], self.gen, self.generator)
        self.seconds += time.perf_counter() - t0
        if tok in self.stop:
            self.done = True
            return self._flush(final=True)
        self.new.append(tok)
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, 1)], dim=1)
        self.done = len(self.new) >= self.gen.max_new_tokens
        return self._flush(final=self.done)


def stream_columns(session: Session, prompt: str, gen: GenSettings) -> Iterator[dict]:
    """Events {'run_id', 'token'} as each column's tokens arrive (columns take turns
    a token at a time), then one {'run_id', 'title', 'output', 'tokens', 'seconds'}
    per column at the end, base first. The base's lock is held for each round of
    tokens, never across a yield: a web server may resume the generator on another
    thread, or never again."""
    ids = prompt_ids(session.tokenizer, prompt)
    decoders = [Decoder(col.model, session.tokenizer, ids, gen) for col in session.columns]
    while not all(d.done for d in decoders):
        pieces = []
        with session.bank.lock:
            for col, d in zip(session.columns, decoders):
                if not d.done:
                    piece = d.step()
                    if piece:
                        pieces.append({"run_id": col.run_id, "token": piece})
        yield from pieces
    for col, d in zip(session.columns, decoders):
        yield {"run_id": col.run_id, "title": col.title, "output": d.text, "tokens": len(d.new),
               "seconds": round(d.seconds, 3)}


def answer_head(session: Session, prompt: str, gen: Optional[GenSettings]) -> dict:
    first = session.chosen[0].cfg
    head = {"task": session.task, "model": first.model, "prompt": prompt,
            "runs": [{"run_id": c.id, "name": c.run["name"], "method": c.run["method"]} for c in session.chosen]}
    if gen is not None:
        head["settings"] = {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
                            "top_p": gen.top_p, "seed": gen.seed}
    return head


def generate_many(settings: Settings, runs: list[dict], prompt: str, gen: GenSettings) -> dict:
    """The whole answer: {'task', 'model', 'prompt', 'runs', 'settings'?, 'outputs': [...]},
    outputs base first, then each run in the order given."""
    prompt = check_prompt(prompt)
    session = open_session(settings, runs)
    if session.task == "classification":
        return {**answer_head(session, prompt, None), "outputs": classify_many(session, prompt)}
    outs = [e for e in stream_columns(session, prompt, gen) if "token" not in e]
    return {**answer_head(session, prompt, gen), "outputs": outs}


def stream_many(session: Session, prompt: str, gen: GenSettings) -> Iterator[dict]:
    """Token events, then the whole answer as one last event with 'done': True."""
    if session.task == "classification":
        yield {"done": True, **answer_head(session, prompt, None), "outputs": classify_many(session, prompt)}
        return
    outs = []
    for e in stream_columns(session, prompt, gen):
        if "token" in e:
            yield e
        else:
            outs.append(e)
    yield {"done": True, **answer_head(session, prompt, gen), "outputs": outs}


# ---- one run beside its base (the API of the single-run playground) ---------------------------------------

@dataclass
class Pair:
    task: str
    base: Any
    adapted: Any
    tokenizer: Any
    labels: list[str]
    max_seq_len: int


def pair_for(settings: Settings, run_id: int) -> Pair:
    session = open_session(settings, [service.get_run(settings, run_id)])
    c = session.chosen[0]
    return Pair(c.cfg.task, session.bank.base, session.columns[1].model, session.tokenizer, c.labels,
                c.cfg.training.max_seq_len)


def try_run(settings: Settings, run_id: int, text: str, max_new_tokens: int = DEFAULT_NEW_TOKENS) -> dict:
    """{'task', 'base', 'adapted'}: label->probability dicts (classification) or greedy text."""
    text = check_prompt(text)
    gen = check_settings(max(1, min(int(max_new_tokens), MAX_NEW_TOKENS)), 0.0, 1.0, 0)
    ans = generate_many(settings, [service.get_run(settings, run_id)], text, gen)
    key = "probabilities" if ans["task"] == "classification" else "output"
    return {"task": ans["task"], "base": ans["outputs"][0][key], "adapted": ans["outputs"][1][key]}
