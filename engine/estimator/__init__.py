"""Memory estimator: bytes of GPU memory one training step needs on each device,
from a model config alone (no weights loaded, no model instantiated).

Rows: cuda_context, weights, gradients, hidden_states (activations saved for
backward), optimizer, total. Three formulas side by side:

- ``slide``: the lecture slide's rule of thumb (weights size·N, gradients and
  two optimizer states for the trainable part, ≈1 GiB CUDA context, hidden
  states size·L·(20·H·seq + 3·seq²)·bs with H the number of attention heads).
- ``appendix``: the slide's rows with the appendix's hidden-state formula
  size·(3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + vocab·seq·bs).
- ``model`` (default): architecture- and method-aware. It walks one forward pass
  of our training loop symbolically and adds up what autograd saves for
  backward, following the method's own activation plan (`MethodSpec.plan`).
  Weights are exact parameter counts; NF4 weights include their block constants.

Runs on several devices (DDP or FSDP) get per-device rows. The package:
`catalog` (configs, GPU presets), `counts` (exact parameter counts),
`formulas` (shared rows, weights and optimizer bytes), `plans` (which
activation plan), `saved` (the saved-activation walk), `devices` (per-device
rows), `estimates` (the public estimate and its cache), `runs` (a run
config's estimate for the device kind that trains it). See docs/estimator.md
for the formulas and the measured accuracy (bench/estimator_accuracy.py).
"""

from .catalog import CATALOG_DIR, GPU_PRESETS, GiB, catalog_names, default_task, load_model_config, model_dims
from .counts import (added_params, block_params, count_total_params, count_trainable, frozen_linear_params,
                     head_params)
from .devices import STRATEGIES, GatheredUnits, gathered_units, per_device_rows
from .estimates import (CACHE_SIZE, Estimate, clear_estimate_cache, estimate, estimate_cache_info, gpu_fits,
                        largest_batch_that_fits, smallest_world_size_that_fits)
from .formulas import (ATTENTIONS, CUDA_CONTEXT_BYTES, DEVICES, DTYPE_BYTES, FORMULA_TEXT, FORMULAS,
                       OPTIMIZER_ALIASES, OPTIMIZERS, QUANTS, ROWS, TASKS, model_weight_bytes, optimizer_bytes,
                       quant_of)
from .plans import activation_plan
from .runs import device_kind, estimate_run, run_estimate_json
from .walk import model_hidden_states

__all__ = [
    "ATTENTIONS", "CACHE_SIZE", "CATALOG_DIR", "CUDA_CONTEXT_BYTES", "DEVICES", "DTYPE_BYTES", "FORMULAS",
    "FORMULA_TEXT", "GPU_PRESETS", "OPTIMIZERS", "OPTIMIZER_ALIASES", "QUANTS", "ROWS", "STRATEGIES", "TASKS",
    "Estimate", "GatheredUnits", "GiB", "activation_plan", "added_params", "block_params", "catalog_names",
    "clear_estimate_cache", "count_total_params", "count_trainable", "default_task", "device_kind", "estimate",
    "estimate_cache_info", "estimate_run", "frozen_linear_params", "gathered_units", "gpu_fits", "head_params",
    "largest_batch_that_fits", "load_model_config", "model_dims", "model_hidden_states", "model_weight_bytes",
    "optimizer_bytes", "per_device_rows", "quant_of", "run_estimate_json", "smallest_world_size_that_fits",
]
