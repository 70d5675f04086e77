"""Try a finished run: the base model and the model with the run's adapter,
side by side. Classification: label probabilities; causal LM: greedy generation.
Loaded models are cached per run id in this process (a small LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from workers.settings import Settings

from . import artifacts

CACHE_SIZE = 2          # runs kept loaded (each holds the base and the adapted model)
MAX_NEW_TOKENS = 48
MAX_INPUT_CHARS = 4000


@dataclass
class Pair:
    task: str
    base: Any
    adapted: Any
    tokenizer: Any
    labels: list[str]
    max_seq_len: int


class ModelCache:
    """LRU of loaded (base, adapted) model pairs by run id; thread-safe."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._items: "OrderedDict[tuple, Pair]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, build) -> Pair:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pair = build()
            self._items[key] = pair
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return pair

    def keys(self) -> list:
        with self._lock:
            return list(self._items)


CACHE = ModelCache()


def build_pair(settings: Settings, run_id: int) -> Pair:
    prep = artifacts.load_trained(settings, run_id)
    labels = prep.examples.labels
    base = artifacts.load_base(settings, prep.config, labels).model.eval()
    return Pair(prep.config.task, base, prep.model.eval(), prep.tokenizer, labels, prep.config.training.max_seq_len)


def pair_for(settings: Settings, run_id: int) -> Pair:
    from . import service

    run = service.get_run(settings, run_id)
    key = (run_id, (run.get("adapter") or {}).get("sha256"))
    return CACHE.get(key, lambda: build_pair(settings, run_id))


def classify(model, tokenizer, text: str, labels: list[str], max_len: int) -> dict[str, float]:
    import torch

    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_len)
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    probs = torch.softmax(logits, -1).tolist()
    names = labels or [str(i) for i in range(len(probs))]
    return {names[i] if i < len(names) else str(i): float(p) for i, p in enumerate(probs)}


def generate(model, tokenizer, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """Greedy generation; the chat template is used when the tokenizer has one."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    n_in = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, n_in:], skip_special_tokens=True)


def try_run(settings: Settings, run_id: int, text: str, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """{'task', 'base', 'adapted'}: label->probability dicts (classification) or generated text."""
    text = (text or "").strip()
    if not text:
        raise ValueError("input: type some text first")
    text = text[:MAX_INPUT_CHARS]
    pair = pair_for(settings, run_id)
    if pair.task == "classification":
        return {"task": pair.task,
                "base": classify(pair.base, pair.tokenizer, text, pair.labels, pair.max_seq_len),
                "adapted": classify(pair.adapted, pair.tokenizer, text, pair.labels, pair.max_seq_len)}
    n = max(1, min(int(max_new_tokens), 256))
    return {"task": pair.task, "base": generate(pair.base, pair.tokenizer, text, n),
            "adapted": generate(pair.adapted, pair.tokenizer, text, n)}
