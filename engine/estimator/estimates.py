"""The public estimate: validated inputs in, rows in bytes out (per device), with
one bounded cache of answers; plus the searches the studio asks for (largest
batch, GPU presets, smallest number of devices)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..loss import LOSS_CHUNK
from .catalog import GPU_PRESETS, GiB, catalog_text, default_task, load_model_config, model_dims
from .counts import added_params, count_total_params, count_trainable, head_params
from .devices import STRATEGIES, gathered_units, per_device_rows
from .formulas import (ATTENTIONS, CUDA_CONTEXT_BYTES, DEVICES, DTYPE_BYTES, FORMULA_TEXT, FORMULAS, MASTER_BYTES,
                       OPTIMIZER_ALIASES, OPTIMIZERS, QUANTS, ROWS, TASKS, appendix_hidden_states,
                       model_weight_bytes, optimizer_bytes, optimizer_step_temporary, quant_of, simple_rows,
                       slide_hidden_states)
from .plans import activation_plan
from .walk import model_hidden_states

CACHE_SIZE = 1024     # answers kept by estimate(); the UI and the batch searches repeat the same questions


@dataclass
class Estimate:
    rows: dict                      # bytes (ints) per device: cuda_context, weights, gradients, hidden_states,
                                    # optimizer, total
    n_params: int
    n_trainable: int
    trainable_ratio: float
    formula: str
    notes: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)   # hidden-state parts (bytes), `model` formula only

    @property
    def total(self) -> int:
        return self.rows["total"]

    def copy(self) -> "Estimate":
        return dataclasses.replace(self, rows=dict(self.rows), notes=list(self.notes),
                                   inputs=_plain_copy(self.inputs), breakdown=dict(self.breakdown))

    def to_json(self) -> dict:
        """The contract shape (README, `peft-studio estimate --json`): n_params,
        n_trainable and the rows in bytes."""
        return {"n_params": self.n_params, "n_trainable": self.n_trainable,
                "rows": {k: int(self.rows[k]) for k in ROWS}}

    def to_dict(self) -> dict:
        """Richer form for the UI: rows in bytes and GiB, formula, ratio, notes."""
        return {
            "n_params": self.n_params, "n_trainable": self.n_trainable,
            "trainable_ratio": self.trainable_ratio,
            "trainable_percent": round(100 * self.trainable_ratio, 4),
            "formula": self.formula,
            "formula_text": FORMULA_TEXT[self.formula],
            "rows": {k: int(self.rows[k]) for k in ROWS},
            "rows_gib": {k: round(self.rows[k] / GiB, 3) for k in ROWS},
            "hidden_states_breakdown": {k: int(v) for k, v in self.breakdown.items()},
            "notes": list(self.notes),
            "inputs": dict(self.inputs),
        }


def _plain_copy(x):
    """A deep copy of JSON-like data (dicts, lists, scalars) several times faster than
    copy.deepcopy; anything else is handed to copy.deepcopy."""
    if isinstance(x, dict):
        return {k: _plain_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain_copy(v) for v in x]
    if x is None or type(x) in (str, int, float, bool):
        return x
    return copy.deepcopy(x)


def _validate(choice: str, options: tuple, field_name: str) -> str:
    if choice not in options:
        raise ValueError(f"{field_name}: {choice!r} is not one of {', '.join(options)}")
    return choice


def _positive_int(value, field_name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field_name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _method(method) -> Any:
    from ..methods import MethodConfig, parse_method_config
    if isinstance(method, MethodConfig):
        return method
    if isinstance(method, str):
        method = {"name": method}
    try:
        return parse_method_config(method)
    except ValueError as e:
        if hasattr(e, "errors"):       # pydantic ValidationError
            from ..config import format_validation_error
            raise ValueError(format_validation_error(e, prefix="method.")) from None
        raise


@dataclass(frozen=True)
class _Query:
    """estimate()'s normalized inputs: equal queries are one cache entry. The
    model config and method config are keyed by their canonical JSON."""

    model: Any
    cfg_json: str
    method_json: str
    batch_size: int
    seq_len: int
    dtype: str
    quant: str
    optimizer: str
    grad_checkpointing: bool
    formula: str
    task: Optional[str]
    num_labels: int
    attention: str
    n_params_override: Optional[int]
    n_trainable_override: Optional[int]
    device: str
    world_size: int
    strategy: str
    cfg: dict = field(compare=False, hash=False, repr=False)
    mcfg: Any = field(compare=False, hash=False, repr=False)


def estimate(model: Union[str, dict], method: Union[dict, Any], *, batch_size: int = 8, seq_len: int = 128,
             dtype: str = "fp32", quant: str = "none", optimizer: str = "adamw", grad_checkpointing: bool = False,
             formula: str = "model", task: Optional[str] = None, num_labels: int = 2, attention: str = "sdpa",
             n_params_override: Optional[int] = None, n_trainable_override: Optional[int] = None,
             device: str = "cuda", world_size: int = 1, strategy: str = "ddp") -> Estimate:
    """Estimate the memory one device needs for one training step. `model`: a
    bundled or catalog name, a path to a config.json, or a config dict. `method`:
    a method config dict (validated), a name, or a MethodConfig. All rows in bytes.

    `world_size` devices with `strategy` 'ddp' (a replica per device) or 'fsdp'
    (weights, gradients and optimizer states sharded); `batch_size` is per device.
    `optimizer`: adamw, adamw_8bit, paged_adamw_8bit (or sgd, no state).
    `n_params_override` / `n_trainable_override` replace the exact counts (the
    slide's N = 7e9). `device='cpu'` models CPU kernels (dropout masks in the
    activation dtype, SDPA's math path under dropout) for comparison with
    measurements taken on CPU. Answers are cached (CACHE_SIZE, least recently used)."""
    _validate(formula, FORMULAS, "formula")
    _validate(dtype, tuple(DTYPE_BYTES), "dtype")
    _validate(quant, QUANTS, "quant")
    optimizer = OPTIMIZER_ALIASES.get(optimizer, optimizer)
    _validate(optimizer, OPTIMIZERS, "optimizer")
    _validate(attention, ATTENTIONS, "attention")
    _validate(device, DEVICES, "device")
    _validate(strategy, STRATEGIES, "strategy")
    if task is not None:
        _validate(task, TASKS, "task")
    _positive_int(batch_size, "batch_size")
    _positive_int(seq_len, "seq_len", 2)
    _positive_int(num_labels, "num_labels")
    _positive_int(world_size, "world_size")
    cfg = load_model_config(model)
    mcfg = _method(method)
    q = _Query(model=model if isinstance(model, str) else cfg.get("model_type"),
               cfg_json=_config_json(model, cfg),
               method_json=json.dumps(mcfg.model_dump(mode="json"), sort_keys=True, default=str),
               batch_size=batch_size, seq_len=seq_len, dtype=dtype, quant=quant, optimizer=optimizer,
               grad_checkpointing=bool(grad_checkpointing), formula=formula, task=task, num_labels=num_labels,
               attention=attention,
               n_params_override=None if n_params_override is None else int(n_params_override),
               n_trainable_override=None if n_trainable_override is None else int(n_trainable_override),
               device=device, world_size=world_size, strategy=strategy, cfg=cfg, mcfg=mcfg)
    return _estimate(q).copy()


def _config_json(model, cfg: dict) -> str:
    """The canonical JSON of a model config (the cache key); worked out once per catalog
    model, whose config is the catalog file's (load_model_config reads it first)."""
    if isinstance(model, str) and "\x00" not in model and catalog_text(model) is not None:
        return _catalog_json(model)
    return json.dumps(cfg, sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _catalog_json(name: str) -> str:
    return json.dumps(json.loads(catalog_text(name)), sort_keys=True, default=str)


_PER_CONFIG: dict = {}        # (what, config JSON, ...) -> dims or total parameter count of that config


def _per_config(key: tuple, work):
    """Facts of a model config alone (its dimensions, its total parameter count), kept
    per config: a query over a model asked about before skips them."""
    value = _PER_CONFIG.get(key)
    if value is None:
        if len(_PER_CONFIG) >= 512:
            _PER_CONFIG.clear()
        value = _PER_CONFIG[key] = work()
    return value


def estimate_cache_info():
    """Hits, misses and size of estimate()'s cache (functools' CacheInfo)."""
    return _estimate.cache_info()


def clear_estimate_cache() -> None:
    _estimate.cache_clear()


@functools.lru_cache(maxsize=CACHE_SIZE)
def _estimate(q: _Query) -> Estimate:
    from ..methods import get_method

    cfg, mcfg = q.cfg, q.mcfg
    # count_trainable implementations that count the classification head themselves (`full`) read num_labels
    dims = _per_config(("dims", q.cfg_json), lambda: model_dims(cfg))
    if dims.num_labels != q.num_labels:   # the held description (and its memo key, ModelDims.key) when they agree
        dims = dataclasses.replace(dims, num_labels=q.num_labels)
    task = q.task or default_task(dims)
    spec = get_method(mcfg.name)
    size = DTYPE_BYTES[q.dtype]
    notes: list[str] = []
    n_params = q.n_params_override if q.n_params_override is not None else _per_config(
        ("n_params", q.cfg_json, task, q.num_labels), lambda: count_total_params(cfg, task, q.num_labels))
    n_tr = q.n_trainable_override if q.n_trainable_override is not None \
        else count_trainable(spec, mcfg, dims, cfg, task, q.num_labels)
    if q.seq_len > dims.max_position_embeddings:
        notes.append(f"seq_len {q.seq_len} is beyond the model's max_position_embeddings "
                     f"({dims.max_position_embeddings})")
    inputs = {"model": q.model, "method": mcfg.model_dump(), "batch_size": q.batch_size, "seq_len": q.seq_len,
              "dtype": q.dtype, "quant": q.quant, "optimizer": q.optimizer,
              "grad_checkpointing": q.grad_checkpointing, "task": task, "num_labels": q.num_labels,
              "attention": q.attention, "device": q.device, "world_size": q.world_size, "strategy": q.strategy}
    breakdown: dict = {}
    if q.formula in ("slide", "appendix"):
        hidden_of = slide_hidden_states if q.formula == "slide" else appendix_hidden_states
        rows = simple_rows(n_params, n_tr, size, hidden_of(dims, size, q.batch_size, q.seq_len))
        if q.quant != "none" or q.optimizer != "adamw" or q.grad_checkpointing:
            notes.append(f"the {q.formula} formula ignores quantization, the optimizer kind and gradient "
                         f"checkpointing (16/32-bit weights, two optimizer states)")
        temporary = None                  # total = the sum of the rows, as the slide adds them
        units = gathered_units(dims, n_params=n_params, n_tr=n_tr, added=0, size=size, quant="none",
                               trains_base_weights=False, trained_layers=dims.num_layers if n_tr else 0)
    else:
        quant = quant_of(spec, mcfg, q.quant)
        if quant != q.quant:
            notes.append(f"{mcfg.name} quantizes the frozen block linears: weights counted as {quant}")
        plan = activation_plan(dims, mcfg, task)
        head = head_params(cfg, dims, task, q.num_labels) if spec.trains_head else 0
        added = added_params(spec, n_tr, head)
        notes.extend(plan.notes)
        hidden, breakdown = model_hidden_states(cfg, dims, plan, batch=q.batch_size, seq=q.seq_len, size=size,
                                                task=task, attention=q.attention, device=q.device,
                                                grad_checkpointing=q.grad_checkpointing,
                                                weight_casts=not (q.world_size > 1 and q.strategy == "fsdp"))
        trains_base = spec.trains_base_weights
        rows = {"cuda_context": CUDA_CONTEXT_BYTES if q.device == "cuda" else 0,
                "weights": model_weight_bytes(dims, n_params, added, size, quant, trains_base, n_tr),
                "gradients": MASTER_BYTES * n_tr,
                "hidden_states": hidden,
                "optimizer": optimizer_bytes(n_tr, MASTER_BYTES, q.optimizer)}
        temporary = optimizer_step_temporary(dims, n_tr, q.optimizer, q.device, plan.embeddings)
        if task == "causal_lm":
            notes.append(f"logits: our chunked cross-entropy keeps one fp32 chunk of ≤{LOSS_CHUNK} tokens × vocab")
        if q.optimizer == "sgd":
            notes.append("sgd: plain SGD without momentum keeps no optimizer state")
        if q.optimizer == "paged_adamw_8bit":
            notes.append("paged_adamw_8bit: its states are counted on the device (paging moves them to CPU "
                         "memory only when the device runs short)")
        units = gathered_units(dims, n_params=n_params, n_tr=n_tr, added=added, size=size, quant=quant,
                               trains_base_weights=trains_base, master=MASTER_BYTES,
                               trained_layers=sum(lp.trains_anything() for lp in plan.layers))
    rows = per_device_rows(rows, world_size=q.world_size, strategy=q.strategy, units=units,
                           step_temporary=temporary)
    if q.world_size > 1:
        if q.strategy == "ddp":
            notes.append(f"per device: DDP keeps a full replica on each of {q.world_size} devices; batch_size is "
                         f"per device (global batch {q.batch_size * q.world_size})")
        else:
            notes.append(f"per device: FSDP shards weights, gradients and optimizer states {q.world_size} ways; "
                         f"each device also holds the all-gathered root and {units.blocks} decoder block(s) "
                         f"({(units.weights + units.gradients) / GiB:.2f} GiB); batch_size is per device")
    rows = {k: int(v) for k, v in rows.items()}
    return Estimate(rows=rows, n_params=n_params, n_trainable=n_tr,
                    trainable_ratio=(n_tr / n_params if n_params else 0.0), formula=q.formula, notes=notes,
                    inputs=inputs, breakdown=breakdown)


def largest_batch_that_fits(gpu_bytes: int, model: Union[str, dict], method, *, max_batch: int = 4096,
                            **kwargs) -> int:
    """The largest batch size (per device) whose estimated total fits in
    `gpu_bytes` (0 if even one sequence does not). Memory grows with the batch,
    so this bisects."""
    kwargs.pop("batch_size", None)
    return _largest(lambda b: estimate(model, method, batch_size=b, **kwargs).total <= gpu_bytes, max_batch)


def smallest_world_size_that_fits(gpu_bytes: int, model: Union[str, dict], method, *, strategy: str = "fsdp",
                                  max_world_size: int = 1024, **kwargs) -> int:
    """The fewest devices of `gpu_bytes` each that hold the run with `strategy`
    (0 if none up to `max_world_size` does). Per-device memory never grows with
    the number of devices, so this bisects; with DDP it is 1 or 0."""
    kwargs.pop("world_size", None)

    def fits(n: int) -> bool:
        return estimate(model, method, world_size=n, strategy=strategy, **kwargs).total <= gpu_bytes

    if fits(1):
        return 1
    if strategy == "ddp" or not fits(max_world_size):
        return 0
    lo, hi = 1, max_world_size          # fits(lo) is False, fits(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _largest(fits, limit: int) -> int:
    """The largest n in 1..limit with fits(n), for fits true up to a point; 0 if fits(1) is False."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def gpu_fits(model: Union[str, dict], method, **kwargs) -> list[dict]:
    """For each GPU preset (16/24/40/48/80 GiB): whether the estimate fits, and
    the largest batch that would."""
    est = estimate(model, method, **kwargs)
    return [{"name": name, "bytes": nbytes, "fits": est.total <= nbytes,
             "largest_batch": largest_batch_that_fits(nbytes, model, method, **kwargs)}
            for name, nbytes in GPU_PRESETS]
