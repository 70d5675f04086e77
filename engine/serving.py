"""Serving a causal LM to many callers at once: one batched computation for a set of
rows (prompts), each with its own sampling settings, for the OpenAI-compatible
endpoint of the studio (studio/openai_api) and anything else that serves.

`run_rows(model, tokenizer, rows)` left-pads the rows' prompts into one batch and
decodes them together, one forward per new token for the whole batch, with the
model's key/value cache. It calls the model as training does (the decoder, then the
output head: engine.generation.next_token_logits), so every method of
engine/methods serves alike, soft prompts and prefixes included. Per row:

- sampling: greedy at temperature 0, else a draw from the temperature-scaled
  nucleus of top-p mass (Holtzman et al. 2020, arXiv:1904.09751), from the row's own
  generator seeded with `seed` (the same seed draws the same tokens);
- a row ends at an EOS id (the token is reported in `tokens`, its text is not part
  of `text`), at any of its `stop` strings (the text is cut before the string), or
  after `max_tokens` new tokens;
- log-probabilities are the model's own (log-softmax of the logits, before the
  temperature), with the `top_logprobs` most likely alternatives per position;
- `echo_scores`: the prompt's own tokens are scored too (each token's log-probability
  given those before it; the first has none) from the same first forward, which is
  what log-likelihood evaluation (lm-evaluation-harness) asks for;
- `on_text(piece)` receives the text as it is made; text that could still become a
  stop string, or an incomplete character, is held back until it cannot.

`FORWARDS` counts the forwards this module ran (a batch of rows is one forward per
step), so a server can show, and tests can check, that batching happened.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .arch import output_head
from .generation import stop_token_ids
from .tokens import format_prompt_ids


class Counter:
    """A thread-safe running count."""

    def __init__(self):
        self._n, self._lock = 0, threading.Lock()

    def add(self, k: int = 1) -> None:
        with self._lock:
            self._n += k

    @property
    def value(self) -> int:
        return self._n


FORWARDS = Counter()


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None        # None: a random seed
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0             # alternatives reported per position
    echo_scores: bool = False         # also score the prompt's tokens


@dataclass
class Token:
    id: int
    text: str
    logprob: Optional[float]          # None: the first prompt token (nothing before it predicts it)
    top: list[tuple[int, str, float]] = field(default_factory=list)   # (id, text, logprob), best first


@dataclass
class Row:
    prompt: list[int]
    sampling: Sampling
    on_text: Optional[Callable[[str], None]] = None
    cancelled: Optional[threading.Event] = None


@dataclass
class Result:
    text: str
    tokens: list[Token]                          # generated tokens, with the EOS that ended the row
    finish_reason: str                           # "stop" | "length" | "cancelled"
    prompt_scores: Optional[list[Token]] = None   # echo_scores: one per prompt token


def context_limit(model: nn.Module) -> Optional[int]:
    """The most positions the model takes (prompt and new tokens), if it says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat (`[{"role", "content"}, ...]`) ready for the assistant's
    answer: the tokenizer's chat template when it has one. Without a template, a
    single user message is formatted as training formats a prompt (so a run answers
    as it learnt to), and a longer chat as one `role: content` line per message."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    if len(messages) == 1 and messages[0]["role"] == "user":
        return format_prompt_ids(tokenizer, messages[0]["content"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------- one row's state

def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid])


def scored(tokenizer, logp: torch.Tensor, tid: int, k: int) -> Token:
    """Token `tid` with its log-probability in `logp` (log-softmax over the vocabulary)
    and the `k` best alternatives."""
    top = []
    if k > 0:
        vals, ids = logp.topk(min(k, logp.shape[-1]))
        top = [(int(i), _token_text(tokenizer, int(i)), float(v)) for v, i in zip(vals.tolist(), ids.tolist())]
    return Token(int(tid), _token_text(tokenizer, tid), float(logp[tid]), top)


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, -1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        above = sorted_p.cumsum(-1) - sorted_p             # the mass ranked above each token
        sorted_p[above >= s.top_p] = 0.0                    # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could still be the start of a stop
    string (or an incomplete character), so must not be shown yet."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class _State:
    def __init__(self, row: Row, tokenizer, stops: set[int]):
        self.row, self.s, self.tok, self.stops = row, row.sampling, tokenizer, stops
        seed = self.s.seed if self.s.seed is not None else secrets.randbelow(2**31)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.ids: list[int] = []
        self.tokens: list[Token] = []
        self.text, self.shown = "", 0
        self.finish: Optional[str] = None if self.s.max_tokens > 0 else "length"
        self.prompt_scores: Optional[list[Token]] = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def step(self, logits: torch.Tensor) -> int:
        """Take the next token from this row's logits [V]; returns it (a finished row: any id)."""
        if self.done:
            return 0
        if self.row.cancelled is not None and self.row.cancelled.is_set():
            self.finish = "cancelled"
            return 0
        tid = pick(logits, self.s, self.gen)
        self.tokens.append(scored(self.tok, logits.log_softmax(-1), tid, self.s.top_logprobs))
        if tid in self.stops:
            self.finish = "stop"
        else:
            self.ids.append(tid)
            self._update_text()
        if not self.done and len(self.tokens) >= self.s.max_tokens:
            self.finish = "length"
        self._show()
        return tid

    def _update_text(self) -> None:
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.s.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            full, self.finish = full[:cut], "stop"
        self.text = full

    def _show(self) -> None:
        if self.row.on_text is None:
            return
        upto = len(self.text) if self.done else len(self.text) - held_back(self.text, self.s.stop)
        if upto > self.shown:
            self.row.on_text(self.text[self.shown:upto])
            self.shown = upto

    def result(self) -> Result:
        return Result(self.text, self.tokens, self.finish or "length", self.prompt_scores)


# ---------------------------------------------------------------- the batch

def _forward(model: nn.Module, ids, mask, pos, cache):
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True)
    FORWARDS.add()
    return out.last_hidden_state, getattr(out, "past_key_values", None)


@torch.no_grad()
def run_rows(model: nn.Module, tokenizer, rows: list[Row], lock: Optional[threading.RLock] = None) -> list[Result]:
    """Decode `rows` as one batch (see the module docstring); results in the order of
    `rows`. `lock`, if given, is held for each forward (a base shared with others)."""
    if not rows:
        return []
    lock = lock or threading.RLock()
    device = next(model.parameters()).device
    head = output_head(model)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    b, width = len(rows), max(len(r.prompt) for r in rows)
    x = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(rows):                     # left padding: every row ends at the last column
        x[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, width - len(r.prompt):] = 1
    x, mask = x.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    states = [_State(r, tokenizer, stops) for r in rows]
    with lock:
        hidden, cache = _forward(model, x, mask, pos, None)
        for i, (r, st) in enumerate(zip(rows, states)):
            if r.sampling.echo_scores:
                n = len(r.prompt)
                logp = head(hidden[i, width - n:width - 1]).float().log_softmax(-1).cpu()
                first = Token(r.prompt[0], _token_text(tokenizer, r.prompt[0]), None)
                st.prompt_scores = [first] + [scored(tokenizer, logp[j], r.prompt[j + 1], r.sampling.top_logprobs)
                                             for j in range(n - 1)]
        logits = head(hidden[:, -1]).float()
    while True:
        # sampled on the CPU with each row's CPU generator: the same seed draws the same on any device
        host = logits.cpu()
        tok = torch.tensor([st.step(host[i]) for i, st in enumerate(states)], dtype=torch.long, device=device)
        if all(st.done for st in states):
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        last = pos[:, -1:] + 1
        pos = torch.cat([pos, last], dim=1)
        x = torch.cat([x, tok[:, None]], dim=1)
        with lock:
            if cache is not None:                    # only the new token goes in
                hidden, cache = _forward(model, tok[:, None], mask, last, cache)
            else:                                    # no cache: the whole sequence again
                hidden, cache = _forward(model, x, mask, pos, None)
            logits = head(hidden[:, -1]).float()
    return [st.result() for st in states]


# ---------------------------------------------------------------- prompts and models

def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a raw completion prompt: the tokenizer's own special tokens at the
    start (a BOS), but none at the end (a BERT-style tokenizer's [SEP] is the tiny
    models' EOS, and a prompt must not end the text it asks to continue)."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
    trailing = {getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "eos_token_id", None)} - {None}
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    while ids and ids[-1] in trailing and len(ids) > len(plain) and (not plain or ids[-1] != plain[-1]):
        ids.pop()
    return ids


def generating_bundled_models() -> list[str]:
    """The bundled models that are causal LMs (their architecture generates text)."""
    from .arch import arch_for_model_type
    from .models import BUNDLED_MODELS

    return [name for name, info in BUNDLED_MODELS.items() if arch_for_model_type(info["family"]).generates]
