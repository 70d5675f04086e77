"""The estimate stored with a run, for the kind of device that trains it.

A run's estimate is first made at submit time for a CUDA device (the studio does
not yet know which worker will claim it; the 1 GiB CUDA context makes it the
conservative figure that routes the run). The worker that claims the run
re-estimates it for its own device kind: a CPU worker gets `device='cpu'` (no
CUDA context, CPU kernels' dropout masks and attention path), a CUDA worker
`device='cuda'`. The stored JSON says which (`device`), so the studio can label
the figure."""

from __future__ import annotations

from typing import Union

from ..precision import run_dtype_name
from .estimates import Estimate, estimate


def device_kind(device: str) -> str:
    """'cuda' for a CUDA device or a worker's device name ('cuda', 'cuda:0',
    'cuda:NVIDIA H200'), 'cpu' for anything else."""
    return "cuda" if str(device).lower().startswith("cuda") else "cpu"


def run_device_kind(cfg, device: str) -> str:
    """The kind of device run config `cfg` trains on when a worker with `device` runs
    it: `training.device: cpu` trains on the CPU whatever the worker has (and `cuda` on
    a CPU worker fails before it trains, so its estimate stays the CUDA one)."""
    if getattr(cfg.training, "device", "auto") in ("cpu", "cuda"):
        return cfg.training.device
    return device_kind(device)


def estimate_run(cfg, model: Union[str, dict], *, device: str = "cuda", num_labels: int = 2) -> Estimate:
    """Estimate one training step of run config `cfg` (an engine.config.RunConfig) per
    device, as the run will train on a worker with `device` (a device kind or a worker's
    device name): on the device `training.device` picks there, in the dtype
    `training.precision` resolves to on it (engine.precision: auto is bf16 on CUDA,
    fp32 on CPU), with its method, batch size, max_seq_len, optimizer, world size and
    strategy. `model`: a name the estimator knows or a config.json dict."""
    t = cfg.training
    dist = t.distributed
    kind = run_device_kind(cfg, device)
    kw = {"optimizer": t.optimizer} if getattr(t, "optimizer", None) else {}
    return estimate(model, cfg.method.model_dump(exclude_none=True), batch_size=t.batch_size,
                    seq_len=t.max_seq_len, dtype=run_dtype_name(t.precision, kind),
                    task=cfg.task, num_labels=num_labels, world_size=dist.world_size, strategy=dist.strategy,
                    device=kind, **kw)


def run_estimate_json(est: Estimate) -> dict:
    """What a run stores: the contract shape (n_params, n_trainable, rows in bytes)
    and the device kind it was made for."""
    return {**est.to_json(), "device": est.inputs.get("device", "cuda")}
