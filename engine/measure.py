"""Measured memory of one real training step, in the estimator's rows.

The estimator (`engine.estimator`) predicts memory from a config; this module
records what one step of *our* training loop really holds, so the two can be
compared row by row:

- `hidden_states`: the bytes of every tensor autograd saves for backward during
  `engine.loss.compute_loss` (recorded with
  `torch.autograd.graph.saved_tensors_hooks`), deduplicated by storage; tensors
  whose storage belongs to a model parameter (frozen or trainable) are weights,
  not activations, and are left out. This is exact and device-independent, so it
  works on CPU.
- `weights`, `gradients`, `optimizer`: bytes of the parameters, of their `.grad`
  after backward, and of the optimizer state after one `step()`.
- On CUDA, `peak_allocated` is `torch.cuda.max_memory_allocated()` over the step.
- `step_peak` runs one clean step the way `engine.train.train` does (the task
  loss and the method's extra loss, backward, gradient clipping, the run's own
  optimizer from `engine.optim`) and records its peak. On CUDA that is
  `max_memory_allocated`; on CPU it is the peak of live bytes in torch's CPU
  allocator (`AllocatorPeak`: every allocation and free the profiler reports
  with `profile_memory=True`, summed in time order) on top of the bytes already
  live before the step (weights and buffers). Memory allocated outside torch's
  allocator (oneDNN scratch, our C kernels' own buffers, Python objects) is not
  counted, and neither is the allocator's caching: it is the CPU analogue of
  `max_memory_allocated`, not of RSS.

Nothing here knows about a database or UI; the bench and slow tests call it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from .arch import arch_for_model_type

ROWS = ("cuda_context", "weights", "gradients", "hidden_states", "optimizer", "total")


@dataclass
class SavedTensor:
    """One storage that autograd kept for backward."""

    shape: tuple
    dtype: str
    nbytes: int           # bytes of the whole storage (what stays allocated)
    op: str               # the grad_fn that saved it, when known


@dataclass
class Measured:
    """Rows (bytes) recorded during one training step."""

    rows: dict
    n_params: int
    n_trainable: int
    batch_size: int
    seq_len: int
    device: str
    seconds: float
    peak_allocated: Optional[int] = None           # CUDA only
    saved: list = field(default_factory=list)      # SavedTensor, largest first (when keep_saved)
    breakdown: dict = field(default_factory=dict)  # forward_saved, loss_chunk (bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["saved"] = d["saved"][:50]
        return d


class SavedTensorRecorder:
    """Context manager: sums the storages autograd saves for backward, once each,
    skipping storages that belong to `params`."""

    def __init__(self, params: list[torch.Tensor], keep: bool = False):
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params if p.device.type != "meta"}
        self._seen: dict[int, SavedTensor] = {}
        self._keep = keep
        self._alive: list[torch.Tensor] = []       # pins storages so a freed pointer is not reused
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self._param_ptrs and ptr not in self._seen and st.nbytes() > 0:
                op = type(t.grad_fn).__name__ if t.grad_fn is not None else ""
                self._seen[ptr] = SavedTensor(tuple(t.shape), str(t.dtype).replace("torch.", ""), st.nbytes(), op)
                self._alive.append(t)
        # what pack returns is what the graph keeps: the tensor itself would tie a
        # saved output to its own grad_fn (a cycle through C++ that gc cannot see, so
        # a forward-only measurement leaked all its activations); a detached alias
        # shares the storage and the version counter without the grad_fn
        return t.detach() if isinstance(t, torch.Tensor) else t

    @staticmethod
    def _unpack(t):
        return t

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self._seen.values())

    def saved(self) -> list[SavedTensor]:
        return sorted(self._seen.values(), key=lambda s: -s.nbytes)

    def release(self) -> None:
        self._alive.clear()

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class LossChunkProbe:
    """The loss's working set on top of the saved activations. Our chunked
    cross-entropy makes one chunk of fp32 logits at a time while every activation
    is still alive (the single-pass path reports each chunk through
    `engine.loss.observe_loss_chunk`; heads with a bias go through
    `torch.utils.checkpoint`, which this probe wraps and runs once under its own
    recorder). `peak` is the largest such chunk in bytes."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.peak = 0
        self._orig = None

    def _wrapped(self, fn, *args, **kw):
        detached = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
                    else a for a in args]
        with torch.enable_grad(), SavedTensorRecorder(self.params) as inner:
            out = fn(*detached)
        self.peak = max(self.peak, inner.total_bytes)
        inner.release()
        del out, detached
        return self._orig(fn, *args, **kw)

    def _observe(self, logits: torch.Tensor) -> None:
        nbytes = logits.numel() * logits.element_size()
        kind = logits.device.type
        if torch.is_autocast_enabled(kind):
            # under autocast the chunk's product is made in the autocast dtype and converted
            # to these fp32 logits: both are live at that moment (and a copy of that size is
            # made again from the gradient chunk for grad_h)
            nbytes += logits.numel() * torch.finfo(torch.get_autocast_dtype(kind)).bits // 8
        self.peak = max(self.peak, nbytes)

    def __enter__(self):
        from . import loss
        self._orig = loss.checkpoint
        loss.checkpoint = self._wrapped
        loss.observe_loss_chunk = self._observe     # the single-pass path: its chunk of fp32 logits
        return self

    def __exit__(self, *exc):
        from . import loss
        loss.checkpoint = self._orig
        loss.observe_loss_chunk = None


def synthetic_batch(task: str, batch_size: int, seq_len: int, vocab_size: int, num_labels: int = 2,
                    seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """A full (unpadded) batch of random token ids: every position is real, so
    the measurement is the worst case for that batch size and length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "classification":
        batch["labels"] = torch.randint(0, num_labels, (batch_size,), generator=g)
    else:
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)


def set_attention(model: nn.Module, attention: str) -> None:
    """Switch the model to 'sdpa' or 'eager' attention."""
    impl = {"sdpa": "sdpa", "eager": "eager", "flash": "sdpa"}[attention]
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:   # older transformers
        model.config._attn_implementation = impl


def measure_step(model: nn.Module, task: str, *, batch_size: int, seq_len: int, num_labels: int = 2,
                 optimizer: str = "adamw", keep_saved: bool = False, seed: int = 0,
                 extra_loss=None, backward: bool = True, amp: Optional[torch.dtype] = None) -> Measured:
    """One step of our training loop (compute_loss, backward, optimizer step) on
    `model` (a method already applied), recording the estimator's rows.
    `backward=False` records the forward only (hidden_states and weights; the
    gradient and optimizer rows are then 0) — what the accuracy bench needs.
    `amp`: the run's autocast dtype (engine.precision.autocast_dtype), None for fp32."""
    from .methods import count_parameters
    from .loss import compute_loss

    params = list(model.parameters())
    device = params[0].device
    vocab = model.get_input_embeddings().num_embeddings
    batch = synthetic_batch(task, batch_size, seq_len, vocab, num_labels, seed, device)
    trainable = [p for p in params if p.requires_grad]
    n_params, n_trainable = count_parameters(model)
    model.train()
    for p in trainable:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with SavedTensorRecorder(params, keep=keep_saved) as rec, LossChunkProbe(params) as chunks, \
            torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss = compute_loss(model, batch, task)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
    forward_saved = rec.total_bytes
    hidden = forward_saved + chunks.peak
    saved = rec.saved() if keep_saved else []
    rec.release()
    if backward:
        loss.backward()
    del loss
    grads = tensor_bytes(p.grad for p in trainable)
    opt_bytes = 0
    if backward and trainable and optimizer != "none":
        opt = make_optimizer(optimizer, trainable)
        opt.step()
        opt_bytes = optimizer_state_bytes(opt)
        opt.zero_grad(set_to_none=True)
        del opt
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    seconds = time.perf_counter() - t0
    weights = tensor_bytes(params)
    breakdown = {"forward_saved": forward_saved, "loss_chunk": chunks.peak}
    rows = {"cuda_context": 0, "weights": weights, "gradients": grads, "hidden_states": hidden,
            "optimizer": opt_bytes}
    rows["total"] = sum(rows.values())
    return Measured(rows=rows, n_params=n_params, n_trainable=n_trainable, batch_size=batch_size, seq_len=seq_len,
                    device=str(device), seconds=seconds, peak_allocated=peak, saved=saved,
                    breakdown=breakdown)


class AllocatorPeak:
    """Context manager: the peak of live bytes that torch's CPU allocator hands out
    inside the block, above what was live when it began (`peak`), and the net
    change at its end (`end`). It runs the profiler with memory profiling and sums
    the allocation records (positive on allocation, negative on free) in time
    order. Frees of tensors allocated before the block are not reported by torch,
    so they do not lower the curve (an over- rather than under-statement)."""

    def __init__(self):
        self.peak = 0
        self.end = 0
        self.n_events = 0
        self._prof = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        from torch._C._profiler import _EventType
        self._prof.__exit__(*exc)
        allocs = []
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                f = node.extra_fields
                if f.device.type == "cpu":
                    allocs.append((node.start_time_ns, int(f.alloc_size)))
            stack.extend(node.children)
        allocs.sort()
        cur = peak = 0
        for _, n in allocs:
            cur += n
            peak = max(peak, cur)
        self.peak, self.end, self.n_events = peak, cur, len(allocs)
        self._prof = None


@dataclass
class StepPeak:
    """One clean training step: rows from the real tensors and the step's peak."""

    weights: int          # bytes of the parameters
    gradients: int        # bytes of the trainable parameters' .grad after backward
    optimizer: int        # bytes of the optimizer's state tensors after step()
    live_before: int      # bytes of parameters and buffers live when the step began
    peak: int             # live_before + the allocator's peak during the step (CPU); max_memory_allocated (CUDA)
    peak_kind: str        # "cpu_allocator" | "cuda_max_allocated"
    seconds: float


def step_peak(prep, *, batch_size: int, seq_len: int, optimizer: Optional[str] = None,
              seed: int = 0) -> StepPeak:
    """The second step of our training loop on a prepared run (the method applied), as
    `engine.train.train` takes it: forward through the task loss plus the method's
    extra loss, backward, `clip_grad_norm_` when the run clips, an optimizer from
    `engine.optim.make_optimizer` (`optimizer`, default the run's), `step()`. A full
    random batch of `batch_size` x `seq_len` tokens. The first step, unmeasured,
    creates the optimizer's states, which are live through every later step."""
    from .optim import make_optimizer as run_optimizer
    from .precision import autocast_dtype
    from .loss import TaskLoss

    model = prep.model
    t = prep.config.training
    params = list(model.parameters())
    device = params[0].device
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.grad = None
    vocab = model.get_input_embeddings().num_embeddings
    num_labels = getattr(model.config, "num_labels", 2)
    model.train()
    runner = TaskLoss(model, prep.config.task, prep.spec.extra_loss)
    amp = autocast_dtype(t.precision, device)
    opt = run_optimizer(optimizer or t.optimizer, trainable, lr=1e-4, weight_decay=t.weight_decay)

    def one_step():
        batch = synthetic_batch(prep.config.task, batch_size, seq_len, vocab, num_labels, seed, device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, extra = runner(batch)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        del loss, extra
        grads = tensor_bytes(p.grad for p in trainable)
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del batch
        return grads

    # the second step is measured: from the first step on, the optimizer's states stay
    # live through every forward and backward (the first step allocates them only in
    # step(), after backward has freed the activations), so a run's peak is a later step's
    one_step()
    live_before = tensor_bytes(list(params) + list(model.buffers())) + optimizer_state_bytes(opt)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with AllocatorPeak() as alloc:
        grads = one_step()
    opt_bytes = optimizer_state_bytes(opt)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak, kind = live_before + alloc.peak, "cpu_allocator"
    del opt
    return StepPeak(weights=tensor_bytes(params), gradients=grads, optimizer=opt_bytes, live_before=live_before,
                    peak=int(peak), peak_kind=kind, seconds=seconds)


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer whose state is measured: AdamW or plain SGD. 8-bit AdamW is
    refused rather than measured as something else."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name in ("adamw_8bit", "paged_adamw_8bit", "adamw8bit"):
        raise ValueError(f"optimizer: {name!r} cannot be measured here (no 8-bit optimizer kernels); "
                         f"measure with adamw and compare against the estimator's 8-bit formula")
    raise ValueError(f"optimizer: unknown {name!r}; choose adamw or sgd")


def measure_prepared(prep, *, batch_size: int, seq_len: int, optimizer: str = "adamw",
                     keep_saved: bool = False, backward: bool = True) -> Measured:
    """Measure one step of a run prepared by `engine.prepare.prepare_run`, under its
    precision (engine.precision)."""
    from .precision import autocast_dtype

    num_labels = getattr(prep.model.config, "num_labels", 2)
    device = next(prep.model.parameters()).device
    return measure_step(prep.model, prep.config.task, batch_size=batch_size, seq_len=seq_len,
                        num_labels=num_labels, optimizer=optimizer, keep_saved=keep_saved,
                        extra_loss=prep.spec.extra_loss, backward=backward,
                        amp=autocast_dtype(prep.config.training.precision, device))


def prepare_for_measure(model_name: str, method: dict, *, task: Optional[str] = None, num_labels: int = 2,
                        attention: str = "sdpa", loaded=None, seed: int = 0, precision: str = "fp32",
                        device: str = "cpu"):
    """A Prepared run for `model_name` + `method` without reading a dataset, in
    `precision` (training.precision) on `device` (training.device): the model is
    placed as a real run's would be (engine.precision).

    `loaded` (an `engine.models.LoadedModel`) is deep-copied, so one loaded model
    can serve many measurements."""
    from .config import parse_run_config
    from .data import Examples
    from .models import TINY_MODELS, BUNDLED_MODELS, load_model
    from .prepare import prepare_run

    if task is None:
        family = TINY_MODELS.get(model_name) or BUNDLED_MODELS.get(model_name, {}).get("family")
        task = "classification" if family and arch_for_model_type(family).is_encoder else "causal_lm"
    labels = [f"label{i}" for i in range(num_labels)] if task == "classification" else []
    dataset = "demo-sentiment" if task == "classification" else "demo-instruct"
    cfg = parse_run_config({"model": model_name, "task": task, "dataset": {"name": dataset}, "method": method,
                            "training": {"seed": seed, "device": device, "precision": precision}})
    if loaded is None:
        loaded = load_model(model_name, task, num_labels=num_labels, seed=seed)
    else:
        loaded = copy.copy(loaded)
        loaded.model = copy.deepcopy(loaded.model)
    set_attention(loaded.model, attention)
    examples = Examples(task=task, train=[], validation=[], labels=labels)
    return prepare_run(cfg, loaded=loaded, examples=examples)


def measure(model_name: str, method: dict, *, batch_size: int = 1, seq_len: int = 128, task: Optional[str] = None,
            num_labels: int = 2, attention: str = "sdpa", optimizer: str = "adamw", loaded=None,
            keep_saved: bool = False, backward: bool = True, precision: str = "fp32",
            device: str = "cpu") -> Measured:
    """Measure one training step of `method` on `model_name` (bundled or tiny) in
    `precision` on `device`."""
    prep = prepare_for_measure(model_name, method, task=task, num_labels=num_labels, attention=attention,
                               loaded=loaded, precision=precision, device=device)
    return measure_prepared(prep, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
                            keep_saved=keep_saved, backward=backward)
