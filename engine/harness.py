"""EleutherAI's lm-evaluation-harness over a model the engine loaded.

`EngineLM(model, tokenizer)` is an `lm_eval.api.model.TemplateLM`: the harness hands it
requests and it answers them with the engine's model, so a run of any method of
engine/methods (prompt methods, adapters, LoRA, full fine-tuning ...) and a bare base
model are evaluated alike, not only the ones a `peft`-format loader understands.

- Tokenization follows the harness's own `hf` model (lm_eval.models.huggingface.HFLM)
  so scores are comparable with it: the tokenizer's default special tokens unless the
  text already starts with the BOS text, the BOS token (else EOS) as the context of an
  empty context, the harness's context/continuation split (TemplateLM._encode_pair),
  its rolling windows for perplexity, the context window of
  `lm_eval.models.utils.resolve_max_length`, and its stop-sequence handling.
- The model is called the way training calls it (engine.loss.compute_loss): the
  decoder (`model.get_decoder()`, where soft prompts, prefixes and adapter hooks live),
  then the output head on the hidden states, in fp32 for the softmax.
- Generation decodes one request at a time with the key/value cache
  (engine.generation.next_token_logits): greedy unless the task asks to sample, then
  temperature sampling from a generator seeded per request. It stops at the EOS token,
  at any of the task's stop strings, or after `max_gen_toks` tokens.

`evaluate(model, tokenizer, tasks, ...)` runs `lm_eval.simple_evaluate` with it and
returns per task the harness's metrics with their standard errors, the task version
and the number of samples (see `summarize`). Tasks come from the harness's own task
registry plus `task_dirs` (directories of harness task YAML), and must find their data
offline (a local `datasets` cache, or local files named in the YAML);
`BenchmarkError` says which task could not and why.

lm_eval is imported by this module only: nothing else in the engine imports it, so the
engine imports without the harness installed.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from .arch import output_head
from .generation import next_token_logits

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BOOTSTRAP_ITERS = 1000


class BenchmarkError(ValueError):
    """A benchmark that cannot run here (unknown task, data not available offline, ...)."""


class EngineLM(TemplateLM):
    """The harness's model interface over an engine-loaded causal LM (see the module docstring)."""

    backend = "causal"

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 8,
                 max_length: Optional[int] = None, device: str | torch.device = "cpu",
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self._max_length = max_length
        self._device = torch.device(device)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eot_token_id or 0)

    # ---- what the harness asks of a model

    @property
    def eot_token_id(self) -> int:
        """EOS; a WordPiece tokenizer without one (the tiny test models) ends at [SEP]."""
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else getattr(tok, "sep_token_id", None)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS, else EOS (as the harness's `hf` model), else [CLS]."""
        tok = self.tokenizer
        for t in (tok.bos_token_id, tok.eos_token_id, getattr(tok, "cls_token_id", None)):
            if t is not None:
                return t
        return 0

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        return resolve_max_length(getattr(self.model, "config", None), self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """fp32 log-probabilities [len(row), vocab] of each row (right-padded batch)."""
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        x, mask = x.to(self._device), mask.to(self._device)
        hidden = self.model.get_decoder()(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
        logp = F.log_softmax(output_head(self.model)(hidden).float(), dim=-1)
        return [logp[i, :len(r)].cpu() for i, r in enumerate(rows)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log P(continuation | context), whether greedy decoding gives the continuation),
        for (key, context ids, continuation ids) triples; the input is cut to the context window
        from the left as the harness's `hf` model does."""
        out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            rows, conts = [], []
            for i in idx:
                _key, ctx, cont = requests[i]
                if not cont:
                    raise BenchmarkError("the harness asked to score an empty continuation")
                rows.append((list(ctx) + list(cont))[-(self.max_length + 1):][:-1])
                conts.append(list(cont))
            for i, row, cont, lp in zip(idx, rows, conts, self._logprobs(rows)):
                part = lp[len(row) - len(cont):]
                target = torch.tensor(cont, dtype=torch.long)
                score = float(part.gather(1, target[:, None]).sum())
                greedy = bool((part.argmax(-1) == target).all())
                out[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in the harness's disjoint rolling windows of the
        context length, each window conditioned on the one token before it."""
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(s for s, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # ---- generation

    @torch.no_grad()
    def _generate(self, ids: list[int], max_new: int, until: list[str], temperature: float,
                  generator: Optional[torch.Generator]) -> list[int]:
        eos = self.eot_token_id
        x = torch.tensor([ids], dtype=torch.long, device=self._device)
        mask = torch.ones_like(x)
        pos = torch.arange(x.shape[1], device=self._device)[None]
        cache, step, made = None, x, []
        for _ in range(max_new):
            logits, cache = next_token_logits(self.model, input_ids=step, attention_mask=mask,
                                              position_ids=pos if cache is None else pos[:, -1:], cache=cache)
            if temperature > 0:
                probs = torch.softmax(logits[0].cpu() / temperature, -1)
                tok = int(torch.multinomial(probs, 1, generator=generator))
            else:
                tok = int(logits[0].argmax())
            if tok == eos:
                break
            made.append(tok)
            if until and any(u and u in self.tok_decode(made) for u in until):
                break
            step = torch.tensor([[tok]], dtype=torch.long, device=self._device)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
            if cache is None:       # a model without a cache reads the whole sequence again
                step = torch.cat([x, torch.tensor([made], dtype=torch.long, device=self._device)], dim=1)
        return made

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context up to the first stop string (the task's `until`
        and the EOS text), at most `max_gen_toks` tokens."""
        eos_text = (self.tok_decode([self.eot_token_id], skip_special_tokens=False)
                    if self.eot_token_id is not None else None)
        out = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_new = int(kw.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise BenchmarkError(f"the task asks for {max_new} new tokens, not fewer than the model's context "
                                     f"of {self.max_length}")
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            gen = torch.Generator().manual_seed(self.seed + n) if temperature > 0 else None
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            if not ids:
                ids = [self.prefix_token_id]
            text = postprocess_generated_text(self.tok_decode(self._generate(ids, max_new, until, temperature, gen)),
                                              stop=until, think_end_token=None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


# ---------------------------------------------------------------- tasks and results

def sandbox_templates() -> None:
    """Render the harness's Jinja prompt templates in Jinja's sandbox, so a task's template
    cannot reach Python internals (`{{ ''.__class__ ... }}`): a user's task YAML is data, not
    code. The harness's own filters are kept; its tasks render the same."""
    import lm_eval.utils as lu
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    if isinstance(lu.env, SandboxedEnvironment):
        return
    env = SandboxedEnvironment(loader=BaseLoader(), undefined=StrictUndefined,
                               keep_trailing_newline=lu.env.keep_trailing_newline)
    env.filters.update(lu.env.filters)
    lu.env = env


def task_manager(task_dirs: Sequence[str | Path] = (), tasks: Sequence[str] = ()):
    """The task registry for `tasks`: only the task YAML under `task_dirs` when they hold
    every one of them (fast), else the harness's own tasks too (indexing those takes
    seconds), `task_dirs` taking precedence."""
    from lm_eval.tasks import TaskManager

    dirs = [str(Path(d)) for d in task_dirs]
    if dirs:
        local = TaskManager(include_path=dirs, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
    return TaskManager(include_path=dirs or None)


def check_tasks(tasks: Sequence[str], manager) -> None:
    """BenchmarkError naming the tasks the harness does not know."""
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        raise BenchmarkError(f"tasks: {', '.join(missing)} not known to the harness or the task directories "
                             f"(see docs/benchmarks.md for adding a task)")


def load_task_dict(tasks: Sequence[str], manager) -> dict:
    """The harness's task objects, their data loaded; BenchmarkError naming the task whose
    data is not available offline."""
    from lm_eval.tasks import get_task_dict

    out = {}
    for t in tasks:
        try:
            out.update(get_task_dict([t], manager))
        except BenchmarkError:
            raise
        except Exception as e:     # datasets raises many kinds (ConnectionError, FileNotFoundError, ...)
            raise BenchmarkError(f"task {t}: its data is not available offline on this worker "
                                 f"({type(e).__name__}: {str(e)[:400]}); put the dataset in the local datasets "
                                 f"cache or write the task over a local file (docs/benchmarks.md)") from None
    return out


def _finite(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def summarize(results: dict, limit: Optional[float]) -> dict:
    """Per task of a `simple_evaluate` result: {"metrics": {name: {"value", "stderr",
    "higher_is_better"}}, "version", "n_samples", "n_total", "limit", "filter"}. A metric
    name keeps its filter when the task has several (`exact_match,strict`)."""
    out: dict[str, dict] = {}
    n_samples = results.get("n-samples") or {}
    versions = results.get("versions") or {}
    hib = results.get("higher_is_better") or {}
    for task, vals in (results.get("results") or {}).items():
        filters = {k.split(",", 1)[1] for k in vals if "," in k and not k.split(",", 1)[0].endswith("_stderr")}
        metrics: dict[str, dict] = {}
        for key, v in vals.items():
            if "," not in key or key.split(",", 1)[0].endswith("_stderr"):
                continue
            name, filt = key.split(",", 1)
            label = name if len(filters) <= 1 else f"{name},{filt}"
            value = _finite(v)
            if value is None:
                continue
            metrics[label] = {"value": value, "stderr": _finite(vals.get(f"{name}_stderr,{filt}")),
                              "higher_is_better": (hib.get(task) or {}).get(name)}
        ns = n_samples.get(task) or {}
        out[task] = {"metrics": metrics, "version": versions.get(task),
                     "n_samples": ns.get("effective"), "n_total": ns.get("original"),
                     "limit": limit, "filter": sorted(filters)[0] if len(filters) == 1 else None}
    return out


def evaluate(model: nn.Module, tokenizer: Any, tasks: Sequence[str], *, limit: Optional[float] = None,
             task_dirs: Sequence[str | Path] = (), batch_size: int = 8, device: str | torch.device = "cpu",
             num_fewshot: Optional[int] = None, seed: int = 1234,
             bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS) -> dict:
    """Run `tasks` on the model with the harness; `summarize`d results per task.
    `limit`: at most this many documents per task (a fraction below 1: that share)."""
    import lm_eval

    if not tasks:
        raise BenchmarkError("tasks: name at least one task")
    # the harness bootstraps some standard errors in a multiprocessing pool: forking a process
    # whose torch has run its OpenMP pool can deadlock, so it bootstraps in this process
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    sandbox_templates()
    manager = task_manager(task_dirs, tasks)
    check_tasks(tasks, manager)
    load_task_dict(tasks, manager)        # each task's data, found offline or a clear error
    lm = EngineLM(model, tokenizer, batch_size=batch_size, device=device, seed=seed)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                  limit=limit, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, log_samples=False)
    return summarize(res, limit)
