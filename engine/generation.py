"""Greedy decoding and generation metrics for causal-LM runs.

At each evaluation of a causal-LM run (training.eval_generate > 0) the training loop
decodes a fixed, seeded sample of validation prompts greedily and scores the outputs
against the validation responses:

- BLEU: corpus BLEU of `sacrebleu` (Post 2018, "A Call for Clarity in Reporting BLEU
  Scores", WMT 2018; Papineni et al. 2002), its default 13a tokenization, 0-100.
- ROUGE-L: `rouge-score` (Google's reimplementation of Lin 2004, "ROUGE: A Package for
  Automatic Evaluation of Summaries"), the F-measure of the longest common subsequence
  with Porter stemming, averaged over rows, 0-1. Its tokenizer keeps ASCII letters and
  digits only, so text in other scripts scores 0 there (BLEU and exact match still count).
- exact match: the output equals the reference after trimming surrounding whitespace, 0-1.

The prompts are formatted exactly as training formats the prompt part of a row
(engine.tokens.format_prompt_ids: the chat template when the tokenizer has one, else
the prompt and a newline), so the model continues where training taught it to answer.

Decoding (`greedy_decode`) works for every method of engine.methods because it calls
the model the way training does: the decoder (`model.get_decoder()`, where the soft
prompt, prefix and adapter hooks live) and then the output head on the last position
only. Rows are left-padded with explicit position ids, so a padded row decodes the
same tokens as the row alone; the key/value cache is kept between steps where the
model returns one (else each step re-reads the whole sequence); each row stops at its
EOS, the batch when all rows have. Distributed runs pass `forward` (the wrapped module
every FSDP forward must go through) and `all_done` (a collective), so all ranks decode
the same prompts in lockstep.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .arch import output_head
from .batching import eval_sample
from .tokens import format_prompt_ids

log = logging.getLogger(__name__)

MAX_SAMPLES = 8              # (prompt, reference, output) triples kept per evaluation
SAMPLE_CHARS = 1000          # each sample string is cut to this many characters
GENERATION_KEYS = ("bleu", "rouge_l", "exact_match", "gen_rows")

# (input_ids, attention_mask, position_ids, cache) -> (logits of the last position [B, V], cache or None)
Forward = Callable[..., tuple]


# ---------------------------------------------------------------- scoring

def score_generations(outputs: Sequence[str], references: Sequence[str]) -> dict:
    """{"bleu" (0-100), "rouge_l" (0-1), "exact_match" (0-1), "gen_rows"} of `outputs`
    against `references` (one reference per output)."""
    outputs, references = [str(o) for o in outputs], [str(r) for r in references]
    if len(outputs) != len(references):
        raise ValueError(f"score_generations: {len(outputs)} outputs but {len(references)} references")
    if not outputs:
        raise ValueError("score_generations: no outputs to score")
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(outputs, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(r, o)["rougeL"].fmeasure for o, r in zip(outputs, references)) / len(outputs)
    em = sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / len(outputs)
    return {"bleu": float(bleu), "rouge_l": float(rouge), "exact_match": float(em), "gen_rows": len(outputs)}


_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def clean_text(s: str, limit: int = SAMPLE_CHARS) -> str:
    """A sample string fit for JSON columns and the UI: no control characters but tab and
    newline, no lone surrogates (PostgreSQL and the drivers refuse them), at most `limit` chars."""
    s = _UNSAFE.sub("\ufffd", str(s))
    return s if len(s) <= limit else s[:limit - 1] + "\u2026"


# ---------------------------------------------------------------- decoding

def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a row: the tokenizer's EOS (what training appends to every
    response) and the model's generation-config EOS ids."""
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(x for x in v if isinstance(x, int))

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return ids


def next_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """One decoding forward as training calls the model (decoder, then the head on the
    last position): (fp32 logits [B, V], the key/value cache or None)."""
    decoder, head = model.get_decoder(), output_head(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  past_key_values=cache, use_cache=True)
    cache = getattr(out, "past_key_values", None)
    return head(out.last_hidden_state[:, -1]).float(), cache


def _prompt_ids(tokenizer, prompt, max_prompt_len: Optional[int]) -> list[int]:
    ids = list(prompt) if isinstance(prompt, (list, tuple)) else format_prompt_ids(tokenizer, str(prompt))
    if max_prompt_len and len(ids) > max_prompt_len:
        ids = ids[-max_prompt_len:]          # the end holds the generation prompt the answer follows
    if not ids:
        fill = tokenizer.bos_token_id if getattr(tokenizer, "bos_token_id", None) is not None else tokenizer.pad_token_id
        ids = [fill if fill is not None else 0]
    return [int(x) for x in ids]


@torch.no_grad()
def greedy_decode(model: nn.Module, tokenizer, prompts: Sequence, max_new_tokens: int, batch_size: int,
                  device: torch.device | str = "cpu", on_token: Optional[Callable[[int, int], None]] = None, *,
                  forward: Optional[Forward] = None, all_done: Optional[Callable[[bool], bool]] = None,
                  amp: Optional[torch.dtype] = None, max_prompt_len: Optional[int] = None,
                  stop_ids: Optional[set[int]] = None,
                  on_batch: Optional[Callable[[int, int], None]] = None) -> list[str]:
    """Greedy continuations of `prompts` (text, formatted as training formats prompts,
    or lists of token ids used as they are), decoded without special tokens and trimmed.

    At most `max_new_tokens` per row, `batch_size` rows per batch (rows of similar
    length together; the results come back in the order of `prompts`). `on_token(i, id)`
    is called for each new token of prompt i as it is made (not for the stop token).
    `forward` replaces `next_token_logits(model, ...)` (a distributed run's wrapped
    module); `all_done(mine)` turns this process's "every row stopped" into the
    group's (every rank then takes the same number of steps). `amp`: autocast dtype.
    `on_batch(done, total)` is called after each batch with the prompts answered so far.
    The model is put in eval mode for the call and restored; the RNG state is untouched."""
    device = torch.device(device)
    fwd = forward or (lambda **kw: next_token_logits(model, **kw))
    stops = stop_token_ids(model, tokenizer) if stop_ids is None else set(stop_ids)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    ids = [_prompt_ids(tokenizer, p, max_prompt_len) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outs: list[list[int]] = [[] for _ in ids]
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for lo in range(0, len(order), max(1, batch_size)):
                rows = order[lo:lo + batch_size]
                made = _decode_batch(fwd, [ids[i] for i in rows], max_new_tokens, pad, stops, device, amp,
                                     all_done, (lambda j, t, rows=rows: on_token(rows[j], t)) if on_token else None)
                for i, toks in zip(rows, made):
                    outs[i] = toks
                if on_batch is not None:
                    on_batch(min(lo + len(rows), len(order)), len(order))
    finally:
        model.train(was_training)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in outs]


def _decode_batch(fwd: Forward, prompts: list[list[int]], max_new: int, pad: int, stops: set[int],
                  device: torch.device, amp, all_done, on_token) -> list[list[int]]:
    b, width = len(prompts), max(len(p) for p in prompts)
    x = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):                    # left padding: every row ends at the last column
        x[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    x, mask = x.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    made: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stops), dtype=torch.long, device=device) if stops else None
    cache, step_ids, step_mask, step_pos = None, x, mask, pos
    for _ in range(max_new):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits, cache = fwd(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, cache=cache)
        tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        for i, (t, d) in enumerate(zip(tok.tolist(), done.tolist())):
            if not d and t not in stops:
                made[i].append(t)
                if on_token is not None:
                    on_token(i, t)
        if stop is not None:
            done |= torch.isin(tok, stop)
        finished = bool(done.all())
        if all_done is not None:
            finished = all_done(finished)
        if finished:
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        last = pos[:, -1:] + 1
        pos = torch.cat([pos, last], dim=1)
        x = torch.cat([x, tok[:, None]], dim=1)
        if cache is not None:                          # only the new token goes in
            step_ids, step_mask, step_pos = tok[:, None], mask, last
        else:                                          # no cache: the whole sequence again
            step_ids, step_mask, step_pos = x, mask, pos
    return made


# ---------------------------------------------------------------- the run's prompt set

@dataclass
class GenerationSet:
    """The validation prompts a run decodes at every evaluation, and their references."""

    prompts: list[str]
    references: list[str]


def _columns(rows) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names is None and getattr(rows, "ds", None) is not None:       # engine.data.Rows
        names = rows.ds.column_names
    if names is None:
        names = list(rows[0].keys()) if len(rows) else []
    return list(names)


def generation_set(validation, cap: int, seed: int, *, label: str = "run",
                   log_reason: bool = True) -> Optional[GenerationSet]:
    """A seeded sample of at most `cap` validation rows (engine.batching.eval_sample: the
    same rows every evaluation), as prompts and references. None, with the reason logged
    once, when generation is off or the rows have no prompt/response split."""
    if not cap or validation is None or len(validation) == 0:
        return None
    cols = _columns(validation)
    if "prompt" not in cols or "response" not in cols:
        if log_reason:
                log.warning("%s: no generation metrics: the dataset has only a text column, so there are no "
                        "references to score outputs against (give prompt_column and response_column)", label)
        return None
    idx = eval_sample(len(validation), cap, seed)
    if hasattr(validation, "select") and hasattr(validation, "column_names"):
        part = validation.select(idx.tolist())
        prompts, refs = [str(p) for p in part["prompt"]], [str(r) for r in part["response"]]
    else:
        rows = [validation[int(i)] for i in idx]
        prompts, refs = [str(r["prompt"]) for r in rows], [str(r["response"]) for r in rows]
    return GenerationSet(prompts, refs)


def has_references(validation) -> bool:
    """True when the rows have a prompt/response split (generation metrics can be scored)."""
    return validation is not None and len(validation) > 0 and {"prompt", "response"} <= set(_columns(validation))


def evaluate_generation(model: nn.Module, tokenizer, gset: GenerationSet, *, max_new_tokens: int, batch_size: int,
                        device: torch.device, amp: Optional[torch.dtype] = None, forward: Optional[Forward] = None,
                        all_done: Optional[Callable[[bool], bool]] = None,
                        max_prompt_len: Optional[int] = None,
                        on_answers: Optional[Callable[[int, int], None]] = None) -> dict:
    """Decode `gset`'s prompts and score them: score_generations' numbers plus `samples`,
    the first MAX_SAMPLES (prompt, reference, output) triples. `on_answers(k, K)` reports
    the answers generated so far, after each batch."""
    if on_answers is not None:
        on_answers(0, len(gset.prompts))
    outputs = greedy_decode(model, tokenizer, gset.prompts, max_new_tokens, batch_size, device, forward=forward,
                            all_done=all_done, amp=amp, max_prompt_len=max_prompt_len, on_batch=on_answers)
    out = score_generations(outputs, gset.references)
    out["samples"] = [{"prompt": clean_text(p), "reference": clean_text(r), "output": clean_text(o)}
                      for p, r, o in list(zip(gset.prompts, gset.references, outputs))[:MAX_SAMPLES]]
    return out
