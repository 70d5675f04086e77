"""The training loop: AdamW, warm-up + linear/cosine schedule, gradient
accumulation, clipping, periodic evaluation, seeds, CPU or CUDA (bf16 autocast),
cancellation and a progress callback. No database or queue knowledge: the
caller passes callbacks. With training.distributed.world_size > 1 the same loop
runs in every rank of a process group (engine.distributed)."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from . import distributed as D
from . import phases
from .compile import COMPILE_BUCKET, compile_blocks, step_begin
from .batching import BatchStream, MultiTaskStream, as_rows, eval_sample, gather, pad_to_multiple
from .config import GENERATION_METRICS, METRIC_DIRECTION
from .generation import GenerationSet, evaluate_generation, generation_set
from .optim import make_optimizer
from .precision import autocast_dtype, grad_scaler, pick_device  # noqa: F401  (pick_device: re-exported)
from .prepare import Prepared
from .tasks import combine_eval, task_context, temperature_probs
from .tokens import tokenize_examples

from .loss import TaskLoss, compute_loss  # noqa: F401  (compute_loss: re-exported)


@dataclass
class StepMetrics:
    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    epoch: float
    eval: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    max_steps: int
    final_loss: Optional[float]
    eval: dict
    best_metric: Optional[float]
    metric_name: str
    tokens_per_s: float
    duration_s: float
    peak_memory_bytes: int
    memory_kind: str            # "cuda_max_allocated" | "cpu_peak_rss"
    device: str
    n_params: int
    n_trainable: int
    cancelled: bool = False
    world_size: int = 1
    rank_peak_memory_bytes: Optional[list] = None   # every rank's peak (world size > 1)
    history: list = field(default_factory=list)
    last_state: Optional[dict] = field(default=None, repr=False)   # resumable state when cancelled

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("history", "last_state")}


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress
    return f


@torch.no_grad()
def evaluate(model: nn.Module, encoded, task: str, batch_size: int, pad_id: int,
             device: torch.device, amp: Optional[torch.dtype], max_batches: Optional[int] = None,
             dist: Optional["D.Dist"] = None, runner: Optional[nn.Module] = None, rows=None,
             on_rows: Optional[Callable[[int, int], None]] = None) -> dict:
    """Mean validation loss and accuracy / perplexity over the rows `rows` (indices;
    default all) of `encoded` (a tokenized dataset or a list of encoded rows), at most
    `max_batches` batches; `eval_rows` says how many rows were scored. `on_rows(n, N)`
    reports the rows scored so far (this rank's share times the world size). Distributed:
    each rank scores its share and the sums are all-reduced (`runner` is the wrapped
    TaskLoss that forward must go through)."""
    if encoded is None or len(encoded) == 0:
        return {}
    data = as_rows(encoded)
    encoded = np.arange(len(data)) if rows is None else np.asarray(rows)
    if max_batches:   # a batch is global: batch_size rows on each rank
        encoded = encoded[:max_batches * batch_size * (dist.world_size if dist is not None else 1)]
    runner = runner if runner is not None else TaskLoss(model, task)
    was_training = model.training
    model.eval()
    mine = D.shard_rows(encoded, dist)
    most = -(-len(encoded) // (dist.world_size if dist is not None else 1))   # rows of the largest share
    n_batches = -(-most // batch_size)
    acc = [0.0, 0.0, 0.0]
    world = dist.world_size if dist is not None else 1
    if on_rows is not None:
        on_rows(0, len(encoded))
    for i in range(n_batches):   # the same number of forwards on every rank (FSDP gathers in each)
        rows = mine[i * batch_size:(i + 1) * batch_size]
        batch = {k: v.to(device) for k, v in gather(data, rows if len(rows) else encoded[:1], pad_id).items()}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            s = runner(batch, sums=True)
        if len(rows):
            loss, correct, count = s.tolist()
            acc = [acc[0] + (loss if task == "classification" else loss * count), acc[1] + correct, acc[2] + count]
        if on_rows is not None:
            on_rows(min(len(encoded), (i + 1) * batch_size * world), len(encoded))
    if dist is not None:
        acc = dist.all_reduce_sum(acc)
    model.train(was_training)
    loss_sum, correct, count = acc
    if task == "classification":
        return {"eval_loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "eval_rows": len(encoded)}
    mean = loss_sum / max(count, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_rows": len(encoded)}


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak` is the maximum seen."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._t = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def total_steps(prep: Prepared, batches_per_epoch: int) -> int:
    t = prep.config.training
    if t.max_steps:
        return t.max_steps
    return max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accum))


def primary_metric(task: str, metric: Optional[str] = None) -> tuple[str, bool]:
    """(name, higher_is_better) of the metric that ranks runs: the config's `metric`
    when given, else accuracy (classification) / eval_loss (causal LM)."""
    name = metric or ("accuracy" if task == "classification" else "eval_loss")
    return name, METRIC_DIRECTION[name]


def generation_sets(prep: Prepared, log_reason: bool = True) -> list[Optional[GenerationSet]]:
    """The fixed validation prompts each task of a causal-LM run decodes at every evaluation
    (training.eval_generate of them; one entry per task, None where a task has no
    prompt/response split); empty when generation is off."""
    cfg, t = prep.config, prep.config.training
    if cfg.task != "causal_lm" or not t.eval_generate:
        return []
    if prep.tasks is None:
        sets = [generation_set(prep.examples.validation, t.eval_generate, t.seed, label=cfg.name, log_reason=log_reason)]
    else:
        sets = [generation_set(ex.validation, t.eval_generate, t.seed, label=f"{cfg.name}: task {name}",
                               log_reason=log_reason) for name, ex in zip(prep.tasks.names, prep.tasks.examples)]
    if cfg.metric in GENERATION_METRICS and not any(sets):
        raise ValueError(f"metric: {cfg.metric!r} needs validation rows with a prompt and a response to score "
                         f"against; {cfg.dataset.label()} has none (give dataset.prompt_column and response_column, "
                         f"or another metric)")
    return sets


def train(prep: Prepared, *, on_step: Optional[Callable[[StepMetrics], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None, progress: bool = False,
          resume_state: Optional[dict] = None,
          on_checkpoint: Optional[Callable[[int, dict], None]] = None,
          on_phase: Optional[phases.Phase] = None) -> TrainResult:
    """Train a prepared run. `on_step` is called after every optimizer step;
    `should_stop` is polled before every step (True ends the run as cancelled);
    `on_phase(text)` hears what the loop does (engine.phases: training, evaluating
    n / N rows, generating k / K answers), as it starts and as evaluations progress.
    StepMetrics.eta_s counts the evaluations still to come (engine.phases.Eta).
    In a process group (training.distributed.world_size > 1) every rank calls this;
    only rank 0 should pass `on_step` / `on_checkpoint` / `progress`, and any
    rank's `should_stop` stops them all at the same step."""
    cfg, t = prep.config, prep.config.training
    dist = D.init(t.distributed, pick_device(t.device))
    if dist is not None:
        D.check_method(prep.spec, dist.strategy, dist.world_size)
    world = dist.world_size if dist is not None else 1
    main = dist is None or dist.is_main
    torch.manual_seed(t.seed)
    device = dist.device if dist is not None else pick_device(t.device)
    amp = autocast_dtype(t.precision, device)   # the contract (engine.precision): prepare_run placed the model
    model = prep.model.to(device)
    scaler = grad_scaler(amp, device)           # fp16: loss scaling
    tok = prep.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = prep.data if prep.data is not None else tokenize_examples(prep.examples, tok, t.max_seq_len)
    val_enc = data.validation
    multi = prep.tasks is not None
    stream_kw = dict(packing=t.packing, max_len=t.max_seq_len, group_by_length=t.group_by_length)
    if multi:   # a batch from one task at a time, tasks drawn by temperature (engine.tasks)
        stream = MultiTaskStream([d.train for d in prep.tasks.data], t.batch_size * world, pad_id, t.seed,
                                 temperature_probs([len(d.train) for d in prep.tasks.data], prep.tasks.temperature),
                                 **stream_kw)
    else:
        stream = BatchStream(data.train, t.batch_size * world, pad_id, t.seed, **stream_kw)   # global batches
    steps = total_steps(prep, stream.batches_per_epoch)
    # bounded evaluation (the final one too, unless eval_full); unset: by device (engine.phases)
    max_rows = phases.eval_rows_bound(t.eval_max_rows, steps, t.batch_size, t.grad_accum, device.type)
    eval_rows = eval_sample(len(val_enc), max_rows, t.seed)
    final_rows = eval_sample(len(val_enc), None if t.eval_full else max_rows, t.seed)
    if resume_state:
        restore_trainable(resume_state, model)
    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError(f"method {cfg.method.name!r} left no trainable parameters")
    if t.compile:
        compile_blocks(model, t.compile)
    runner = TaskLoss(model, cfg.task, prep.spec.extra_loss)
    if dist is not None:
        runner = D.wrap(runner, model, dist)
    params = [p for p in model.parameters() if p.requires_grad]     # FSDP: its sharded DTensors
    opt = make_optimizer(t.optimizer, params, lr=t.learning_rate, weight_decay=t.weight_decay,
                         fsdp=dist is not None and dist.strategy == "fsdp")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.scheduler, t.warmup_steps, steps))
    start_step = 0
    if resume_state:
        start_step = restore_loop_state(resume_state, opt, sched, stream, params, scaler)
    if dist is not None and dist.rank > 0:    # its own dropout masks; rank 0 keeps the run's stream
        torch.manual_seed(t.seed + 1_000_003 * dist.rank + start_step)
    metric_name, higher = primary_metric(cfg.task, cfg.metric)
    gen_sets = generation_sets(prep, log_reason=main)
    eta = phases.run_eta(t, start_step, steps, max_rows, sum(len(g.prompts) for g in gen_sets if g is not None),
                         [len(d.validation) for d in prep.tasks.data] if multi else [len(val_enc)])
    bar_ref: list = [None]

    def say(text: str) -> None:   # the phase, to the caller and onto the progress bar
        if on_phase is not None and main:
            on_phase(text)
        if bar_ref[0] is not None:
            bar_ref[0].set_description_str(f"{cfg.name} · {text}", refresh=True)
    history: list[dict] = []
    best: Optional[float] = None
    last_eval: dict = {}
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start_step, desc=cfg.name, unit="step")
        bar_ref[0] = bar
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    tokens_seen, loss_val, cancelled = 0, None, False
    t0 = time.perf_counter()
    step = start_step
    say(phases.training(step, steps))

    def gen_eval(ev: dict, i: int, task_name: str = "") -> dict:   # the generation metrics of task i joined to its eval
        gs = gen_sets[i] if i < len(gen_sets) else None
        if not ev or gs is None:
            return ev
        wrapped = D.eval_module(runner, dist)   # under FSDP every rank decodes the same prompts in lockstep
        return {**ev, **evaluate_generation(
            model, tok, gs, max_new_tokens=t.eval_generate_tokens, batch_size=t.batch_size, device=device, amp=amp,
            max_prompt_len=t.max_seq_len, forward=(lambda **kw: wrapped(kw, decode=True)) if dist is not None else None,
            all_done=(lambda mine: not dist.any(not mine)) if dist is not None else None,
            on_answers=lambda k, n: say(phases.generating(k, n, task_name)))}

    def run_eval(final: bool) -> dict:
        kw = dict(dist=dist, runner=D.eval_module(runner, dist))
        if not multi:
            return gen_eval(evaluate(model, val_enc, cfg.task, t.batch_size, pad_id, device, amp, t.eval_batches,
                                     rows=final_rows if final else eval_rows,
                                     on_rows=lambda n, N: say(phases.evaluating(n, N)), **kw), 0)
        per = {}
        for i, (name, d) in enumerate(zip(prep.tasks.names, prep.tasks.data)):
            n = len(d.validation)
            with task_context(model, i):
                per[name] = gen_eval(evaluate(model, d.validation, cfg.task, t.batch_size, pad_id, device, amp,
                                              t.eval_batches, rows=eval_sample(n, None if final and t.eval_full
                                                                               else max_rows, t.seed),
                                              on_rows=lambda a, b, name=name: say(phases.evaluating(a, b, name)),
                                              **kw), i, name)
        return combine_eval({k: v for k, v in per.items() if v})

    def snapshot() -> dict:   # a collective under FSDP: every rank builds it, rank 0 keeps it
        return training_state(model, opt, sched, stream, step, scaler)

    with PeakRSS() as rss:
        while step < steps:
            step_t0 = time.perf_counter()
            stop = bool(should_stop and should_stop())
            if dist is not None:
                stop = dist.any(stop)
            if stop:
                cancelled = True
                break
            loss_acc = 0.0
            step_tokens = 0
            step_begin(t.compile)
            for micro in range(t.grad_accum):
                batch = stream.next()
                if t.compile:       # a few bucketed lengths rather than one compiled shape per batch
                    batch = pad_to_multiple(batch, COMPILE_BUCKET, pad_id)
                step_tokens += int(batch["attention_mask"].sum())
                weight = 1.0
                if dist is not None:
                    batch, weight = D.shard_batch(batch, dist, cfg.task)
                batch = {k: v.to(device) for k, v in batch.items()}
                with D.no_grad_sync(runner, dist, micro == t.grad_accum - 1 or step == start_step), \
                        (task_context(model, stream.last_task) if multi else contextlib.nullcontext()):
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        task_loss, extra = runner(batch)
                        if dist is None:
                            loss = task_loss if extra is None else task_loss + extra
                        else:   # this rank's share of the global mean; DDP/FSDP average over ranks
                            loss = task_loss * weight if extra is None else task_loss * weight + extra
                    scaled = loss / t.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                # read once the backward is queued: checking before it made the host wait for the
                # device's forward before it could launch a single backward kernel
                if not math.isfinite((task_loss if dist is not None else loss).item()):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step + 1}; "
                                             f"try a lower training.learning_rate")
                if dist is None:
                    loss_acc += loss.item() / t.grad_accum
                else:
                    loss_acc += (task_loss.item() * weight / world
                                 + (extra.item() / world if extra is not None else 0.0)) / t.grad_accum
            if dist is not None:
                loss_acc = dist.all_reduce_sum([loss_acc])[0]
            if scaler is not None:   # true gradients for the method's hook and the clipping
                scaler.unscale_(opt)
            if prep.spec.after_backward is not None:
                prep.spec.after_backward(model, step, steps)
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            lr_used = sched.get_last_lr()[0]
            if scaler is not None:   # skips the step when the fp16 gradients overflowed, then lowers the scale
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if prep.spec.after_step is not None:
                prep.spec.after_step(model, step, steps)
            step += 1
            tokens_seen += step_tokens
            loss_val = loss_acc
            elapsed = time.perf_counter() - t0
            eta.add_step(time.perf_counter() - step_t0)
            eval_now = (t.eval_every and step % t.eval_every == 0) or step == steps
            ev = None
            if eval_now:
                eval_t0 = time.perf_counter()
                ev = run_eval(step == steps)
                eta.add_eval(time.perf_counter() - eval_t0)
                if step < steps:
                    say(phases.training(step, steps))
            if ev:
                last_eval = ev
                m = ev.get(metric_name)
                if m is not None and (best is None or (m > best if higher else m < best)):
                    best = m
            sm = StepMetrics(step=step, max_steps=steps, loss=loss_val, lr=lr_used,
                             tokens_per_s=tokens_seen / elapsed if elapsed > 0 else 0.0, elapsed_s=elapsed,
                             eta_s=eta.left(step),
                             epoch=stream.position, eval=ev)
            history.append(sm.to_dict())
            if bar is not None:
                bar.update(1)
                shown = ev.get(metric_name) if ev else None
                bar.set_postfix(loss=f"{loss_val:.4f}", **({metric_name: f"{shown:.4f}"} if shown is not None else {}))
            if on_step and main:
                on_step(sm)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps \
                    and (on_checkpoint or dist is not None):
                state = snapshot()
                if on_checkpoint and main:
                    on_checkpoint(step, state)
        last_state = snapshot() if cancelled else None
        D.unshard_for_export(runner, dist)
    if bar is not None:
        bar.close()
    duration = time.perf_counter() - t0
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = rss.peak, "cpu_peak_rss"
    peaks = [int(x) for x in dist.gather_objects(int(peak))] if dist is not None else None
    model.eval()
    return TrainResult(steps=step, max_steps=steps, final_loss=loss_val, eval=last_eval, best_metric=best,
                       metric_name=metric_name, tokens_per_s=tokens_seen / duration if duration > 0 else 0.0,
                       duration_s=duration, peak_memory_bytes=int(peak), memory_kind=kind, device=device_name(device),
                       n_params=prep.n_params, n_trainable=prep.n_trainable, cancelled=cancelled, world_size=world,
                       rank_peak_memory_bytes=peaks, history=history, last_state=last_state)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole (gathered from FSDP shards: a collective then)."""
    return {n: D.full(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def training_state(model, opt, sched, stream, step: int, scaler=None) -> dict:
    """A resumable state in one format for every world size: whole tensors, the
    optimizer state indexed like the trainable parameters, the global data position,
    and an fp16 run's loss scale (without it a resumed run would restart at 2^16 and
    skip steps the uninterrupted run took). The optimizer tensors are the live ones,
    not copies: persist the state (engine.state_file) before the next step."""
    return {"step": step, "trainable": trainable_state(model), "optimizer": D.full_optimizer_state(opt),
            "scheduler": sched.state_dict(), "data": stream.state(),
            "rng": torch.get_rng_state(), "scaler": scaler.state_dict() if scaler is not None else None}


def restore_trainable(state: dict, model: nn.Module) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise ValueError(f"checkpoint does not fit this model: no parameter {missing[0]!r}")
    with torch.no_grad():
        for n, v in state["trainable"].items():
            params[n].copy_(v.to(params[n].device))


def restore_loop_state(state: dict, opt, sched, stream, params: list, scaler=None) -> int:
    D.load_full_optimizer_state(opt, state["optimizer"], params)
    if scaler is not None and state.get("scaler"):   # absent in states written before it was kept
        scaler.load_state_dict(state["scaler"])
    sched.load_state_dict(state["scheduler"])
    stream.restore(state["data"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def restore_training_state(state: dict, model, opt, sched, stream, scaler=None) -> int:
    """Parameters, optimizer, schedule, data position, RNG and loss scale from `training_state`."""
    restore_trainable(state, model)
    return restore_loop_state(state, opt, sched, stream, [p for p in model.parameters() if p.requires_grad], scaler)
