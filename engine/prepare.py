"""From a run config to a ready-to-train model: load the model and data, apply the
method, make the task head trainable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .arch import head_modules
from .config import RunConfig
from .data import DataProgress, Examples, load_examples
from .methods import ApplyContext, MethodSpec, count_parameters, get_method
from .loading import reread_fp32
from .models import LoadedModel, load_model
from .precision import param_set, pick_device, place_base, run_dtype, settle_dtypes
from .swaps import fuse_swiglu_mlps, use_fast_linears, use_fused_layers
from .tasks import TaskSet, install_task_heads
from .tokens import Tokenized, tokenize_examples


@dataclass
class Prepared:
    config: RunConfig
    model: nn.Module
    tokenizer: object
    examples: Examples
    spec: MethodSpec
    ctx: ApplyContext
    n_params: int
    n_trainable: int
    data: Optional[Tokenized] = None     # tokenized train / validation (Arrow); None: train() tokenizes
    tasks: Optional[TaskSet] = None      # a multi-task run (dataset.tasks): examples / data hold its first task

    @property
    def trainable_ratio(self) -> float:
        return self.n_trainable / self.n_params if self.n_params else 0.0


def apply_method(model: nn.Module, spec: MethodSpec, method_cfg, ctx: ApplyContext) -> nn.Module:
    """Apply a method; classification heads stay trainable (peft's modules_to_save).
    The model's SwiGLU MLPs are first swapped for the fused, leaner-memory version,
    and its plain nn.Linear layers then compute on oneDNN on CPU where measured faster (engine.swaps, engine.gemm;
    same math and parameter names)."""
    fuse_swiglu_mlps(model)
    replaced = spec.apply(model, method_cfg, ctx)
    model = replaced if isinstance(replaced, nn.Module) else model
    use_fast_linears(model)
    use_fused_layers(model)
    if ctx.task == "classification" and spec.trains_head:
        for _, head in head_modules(model):
            for p in head.parameters():
                p.requires_grad_(True)
    return model


def prepare_run(cfg: RunConfig, *, loaded: Optional[LoadedModel] = None,
                allowed_roots: Optional[Sequence[str | Path]] = None, cache_dir: Optional[Path] = None,
                path_resolver: Optional[Callable[[str], Path]] = None, max_data_bytes: Optional[int] = None,
                examples: Optional[Examples] = None, data_cache_dir: Optional[Path] = None,
                on_data_progress: Optional[DataProgress] = None, progress: bool = False) -> Prepared:
    """Load the model and the data and apply the method. The model comes back on its
    device (training.device) in the run's precision (engine.precision): frozen base
    weights in the run dtype, trainable parameters fp32; loaded straight that way
    (engine.loading) unless `loaded` is given. The data is read, mapped and
    tokenized into memory-mapped Arrow tables cached under `data_cache_dir` (default:
    engine.data.default_cache_dir()); `on_data_progress(stage, rows_done, rows_total)`
    reports the tokenization (engine.data.format_progress words it), `progress` draws a
    tqdm bar with rows/s."""
    spec = get_method(cfg.method.name)
    if cfg.training.packing and spec.family == "prompt":
        raise ValueError(f"training.packing: not with method {cfg.method.name!r} (its virtual tokens would be "
                         f"shared by every example of a pack)")
    kw = {"max_bytes": max_data_bytes} if max_data_bytes else {}
    tasks = None
    if cfg.dataset.tasks:
        task_examples = [load_examples(src, cfg.task, seed=cfg.training.seed, path_resolver=path_resolver,
                                       cache_dir=data_cache_dir, on_progress=on_data_progress, **kw)
                         for src in cfg.dataset.sources()]
        tasks = TaskSet(cfg.dataset.task_names, task_examples, temperature=cfg.dataset.sampling_temperature)
        examples = task_examples[0]
    elif examples is None:
        examples = load_examples(cfg.dataset, cfg.task, seed=cfg.training.seed, path_resolver=path_resolver,
                                 cache_dir=data_cache_dir, on_progress=on_data_progress, **kw)
    device = pick_device(cfg.training.device)
    dtype = run_dtype(cfg.training.precision, device)
    if loaded is None:   # straight to the run's dtype and device (docs/precision.md)
        id2label = dict(enumerate(examples.labels)) if cfg.task == "classification" else None
        transform = spec.load_transform(cfg.method, dtype) if spec.load_transform is not None else None
        loaded = load_model(cfg.model, cfg.task, num_labels=max(2, examples.num_labels), allowed_roots=allowed_roots,
                            cache_dir=cache_dir, seed=cfg.training.seed, id2label=id2label, dtype=dtype,
                            device=device, transform=transform)
    if tasks is not None and cfg.task == "classification":
        install_task_heads(loaded.model, tasks.num_labels, seed=cfg.training.seed)
    # a model loaded elsewhere (a caller's copy, new task heads) is put in place here; what it held
    # before stays reachable until the method is applied, for trainable weights' exact fp32 values
    previous = place_base(loaded.model, dtype, device)
    base = param_set(loaded.model.parameters())
    ctx = ApplyContext(task=cfg.task, seed=cfg.training.seed, tokenizer=loaded.tokenizer, dtype=dtype)
    torch.manual_seed(cfg.training.seed)
    model = apply_method(loaded.model, spec, cfg.method, ctx)
    reread = reread_fp32(loaded.checkpoint, loaded.loaded_keys) if loaded.loaded_keys else None
    settle_dtypes(model, dtype, base=base,
                  exact=lambda p: previous.get(p) if p in previous else (reread(p) if reread else None))
    del previous
    n_params, n_trainable = count_parameters(model)
    data = None
    if tasks is not None:
        tasks.data = [tokenize_examples(ex, loaded.tokenizer, cfg.training.max_seq_len, cache_dir=data_cache_dir,
                                        on_progress=on_data_progress, progress=progress) for ex in tasks.examples]
        data = tasks.data[0]
    elif len(examples.train):
        data = tokenize_examples(examples, loaded.tokenizer, cfg.training.max_seq_len, cache_dir=data_cache_dir,
                                 on_progress=on_data_progress, progress=progress)
    return Prepared(cfg, model, loaded.tokenizer, examples, spec, ctx, n_params, n_trainable, data, tasks)


def dry_run(cfg: RunConfig, model_config: dict) -> tuple[int, int]:
    """(n_params, n_trainable) of `cfg` applied to a weightless copy of the model
    described by `model_config` (a config.json dict with `model_type`), built on
    the meta device: checks that the method fits the model (target modules exist)
    without loading or allocating weights. A config Transformers cannot build is a
    ValueError naming `model`; the method's own errors pass through."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    conf = dict(model_config)
    mt = conf.pop("model_type", None)
    if not mt:
        raise ValueError("model: the model's config.json has no model_type")
    try:
        hf_conf = AutoConfig.for_model(mt, **{k: v for k, v in conf.items()
                                              if k not in ("architectures", "transformers_version", "_name_or_path")})
    except Exception as e:
        raise ValueError(f"model: unsupported config: {e}") from None
    cls = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(hf_conf)
    model = apply_method(model, get_method(cfg.method.name), cfg.method,
                         ApplyContext(task=cfg.task, seed=cfg.training.seed))
    return count_parameters(model)
