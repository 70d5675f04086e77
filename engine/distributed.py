"""One run over several processes with torch.distributed: the process group, the
DDP / FSDP2 wrapping, the per-rank shard of each global batch, full checkpoints
from sharded state, and a local launcher built on torch's elastic agent.

Launchers (starting the N processes) are in engine.launch. World size 1 never touches this module's process-group code: `init` returns None
and the training loop runs as a single process.

- `ddp`: `DistributedDataParallel` (Li et al., "PyTorch Distributed: Experiences on
  Accelerating Data Parallel Training", VLDB 2020) over the trainable parameters;
  frozen ones are ignored by its reducer.
- `fsdp`: FSDP2 `fully_shard` (Zhao et al., "PyTorch FSDP", VLDB 2023) on every
  decoder block, then on the root, so frozen and trainable weights, gradients and
  optimizer states are split N ways. It runs on CPU with gloo (torch 2.13).

Backends: gloo on CPU, nccl on CUDA. The global batch is batch_size x world_size
rows (per accumulation step); every rank builds the same global batch and keeps
its contiguous share, and its loss is weighted by its share of the global token
count, so N ranks take the same step as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as tdist
from torch import nn

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A distributed run that cannot start or that lost a rank; the message says which and why."""


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    strategy: str                 # "ddp" | "fsdp"
    device: torch.device
    backend: str                  # "gloo" | "nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"environment WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init(dist_cfg, device: torch.device) -> Optional[Dist]:
    """Join (or reuse) the process group described by the elastic launcher's
    environment. None for world size 1: no process group at all."""
    want = dist_cfg.world_size
    have = env_world_size()
    if want == 1 and have == 1:
        return None
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if want > 1 and missing:
        raise DistributedError(
            f"training.distributed.world_size is {want} but this process was not started as one of {want} ranks "
            f"(no {', '.join(missing)} in the environment): launch it with engine.launch.launch_local, "
            f"`peft-studio train`, or torchrun --nproc-per-node {want}")
    if have != want:
        raise DistributedError(f"training.distributed.world_size is {want} but the launcher started {have} ranks")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: local rank {local_rank} has no CUDA device "
                                   f"(this machine has {torch.cuda.device_count()})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                 **({"device_id": device} if backend == "nccl" else {}))
    return Dist(rank, want, local_rank, dist_cfg.strategy, device, backend)


def check_method(spec, strategy: str, world_size: int) -> None:
    """Refuse, with the reason, a method that cannot run under this strategy. DDP runs
    every method: each rank holds the whole model and, after backward, the same
    averaged gradients, so hooks such as AdaLoRA's rank allocation see identical
    inputs and make identical choices on every rank."""
    if world_size > 1 and strategy == "fsdp" and (spec.after_backward is not None or spec.after_step is not None):
        raise DistributedError(
            f"method {spec.name!r} cannot run with training.distributed.strategy 'fsdp': its training hooks read "
            f"whole parameters and gradients between steps, and FSDP keeps only a 1/{world_size} shard on each "
            f"rank; use strategy 'ddp'")


# ---- the batch each rank trains on ---------------------------------------------------------------

def target_count(batch: dict, task: str) -> int:
    """What the mean loss of `batch` is averaged over: predicted tokens (causal LM) or rows."""
    if task == "classification":
        return int(batch["labels"].shape[0])
    return int((batch["labels"][:, 1:] != -100).sum())


def shard_batch(batch: dict, dist: Dist, task: str) -> tuple[dict, float]:
    """This rank's contiguous share of a global batch and the weight of its mean loss:
    (its targets / all targets) x world size, so that DDP's gradient average is the
    gradient of the global mean. A rank left without rows (a short last batch)
    computes on one row with weight 0, so every rank runs the same collectives."""
    n_global = target_count(batch, task)
    rows = batch["input_ids"].shape[0]
    lo, hi = _split(rows, dist.world_size, dist.rank)
    if hi <= lo:
        local = {k: v[:1] for k, v in batch.items()}
        return local, 0.0
    local = {k: v[lo:hi] for k, v in batch.items()}
    width = int(local["attention_mask"].sum(dim=1).max())    # drop columns that are padding in every local row
    if width < local["input_ids"].shape[1]:
        local = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in local.items()}
    n_local = target_count(local, task)
    return local, (n_local / n_global * dist.world_size) if n_global else 0.0


def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    lo = i * base + min(i, extra)
    return lo, lo + base + (1 if i < extra else 0)


def shard_rows(rows: list, dist: Optional[Dist]) -> list:
    if dist is None:
        return rows
    lo, hi = _split(len(rows), dist.world_size, dist.rank)
    return rows[lo:hi]


# ---- wrapping --------------------------------------------------------------------------------------

def wrap(runner: nn.Module, model: nn.Module, dist: Dist) -> nn.Module:
    """`runner` (a module whose forward computes the loss through `model`) under DDP
    or FSDP2. The returned module is what forward must go through."""
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # static_graph: the set of trainable parameters that get gradients is the same every
        # step, so DDP learns it once (prompt/prefix methods and heads that a task does not
        # use need no find_unused_parameters search per step)
        return DDP(runner, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                   static_graph=True, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import fully_shard
    from .arch import blocks

    kw = {"mp_policy": mp} if (mp := mixed_precision_policy(model)) is not None else {}
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(runner, **kw)
    return runner


def mixed_precision_policy(model: nn.Module):
    """FSDP2's policy for a model under the precision contract (engine.precision): a bf16
    or fp16 frozen base beside fp32 trainable parameters (and fp32 LayerNorms). Each unit
    is all-gathered and computed in the 16-bit dtype (the fp32 parameters are cast for
    the forward, as autocast would), gradients are reduced in fp32 into the fp32
    sharded master weights. None for an fp32 model: FSDP's default, unchanged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if not low:
        return None
    if len(low) > 1:
        raise DistributedError(f"training.distributed.strategy 'fsdp': the model mixes {sorted(map(str, low))}; "
                               f"one 16-bit run dtype is expected")
    return MixedPrecisionPolicy(param_dtype=low.pop(), reduce_dtype=torch.float32)


@contextlib.contextmanager
def no_grad_sync(runner: nn.Module, dist: Optional[Dist], sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last accumulation
    micro-batch. The caller syncs every micro-batch of the first step: DDP's static
    graph is learnt from a synced backward (a no_sync one first trips its reducer)."""
    if dist is None or sync:
        if dist is not None and dist.strategy == "fsdp":
            runner.set_requires_gradient_sync(True)
        yield
    elif dist.strategy == "ddp":
        with runner.no_sync():
            yield
    else:
        runner.set_requires_gradient_sync(False)
        yield


def eval_module(runner: nn.Module, dist: Optional[Dist]) -> nn.Module:
    """What evaluation calls: DDP's inner module (no reducer involved), FSDP's root."""
    if dist is not None and dist.strategy == "ddp":
        return runner.module
    return runner


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a DTensor shard (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def as_local_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (whole) shaped like `param`: this rank's shard when `param` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with every sharded state tensor made whole (collective under FSDP)."""
    sd = opt.state_dict()
    return {"state": {i: {k: (full(v).cpu() if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                          for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, state: dict, params: list[torch.Tensor]) -> None:
    """Load a whole-tensor optimizer state into an optimizer over (possibly sharded) params."""
    st = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        st[i] = {k: (as_local_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in s.items()}
    opt.load_state_dict({"state": st, "param_groups": state["param_groups"]})


def unshard_for_export(runner: nn.Module, dist: Optional[Dist]) -> None:
    """Gather every FSDP module's parameters back into plain tensors (collective), so the
    model can be read, saved and evaluated like an unsharded one."""
    if dist is None or dist.strategy != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule
    # under a mixed precision policy unshard() gathers the 16-bit compute copies; the trainable
    # parameters are exported from their fp32 sharded master weights instead
    masters = {n: full(p.detach()) for n, p in runner.named_parameters()
               if p.requires_grad and p.dtype == torch.float32} if _mixed(runner) else {}
    for m in runner.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
    for n, p in runner.named_parameters():
        if n in masters:
            p.data = masters[n].to(p.device)


def _mixed(runner: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    for m in runner.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            return getattr(state._mp_policy, "param_dtype", None) is not None
    return False


# ---- helpers for launchers (engine.launch) -------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
