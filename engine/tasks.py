"""Multi-task runs (`dataset.tasks`): one run over several datasets, one task each.

- Which task a forward is for: the training loop and evaluation wrap every forward of
  a multi-task run in `task_context(model, index)`. Modules that depend on the task
  subclass `TaskConditioned` and read `self.task_index` (a method's layers, such as
  HyperFormer's generated adapters, and the per-task classification heads). A
  single-task run never sets it: every such module stays at task 0.
- Heads: one classification head per classification task (`install_task_heads`),
  each with its task's number of labels; causal-LM tasks share the LM head.
- Sampling: a batch comes from one task, task i drawn with probability
  p_i ~ n_i^(1/T) (temperature sampling; Karimi Mahabadi et al. 2021 after
  Raffel et al. 2020); the stream itself is engine.batching.MultiTaskStream.
- Metrics: evaluation runs per task; `combine_eval` names each task's numbers
  `eval/<task>/<metric>` and reports their unweighted average under the plain names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .arch import head_modules, set_submodule


class TaskConditioned(nn.Module):
    """A module whose forward depends on the current task (`self.task_index`, 0-based)."""

    task_index: int = 0


def conditioned_modules(model: nn.Module) -> list[TaskConditioned]:
    return [m for m in model.modules() if isinstance(m, TaskConditioned)]


@contextlib.contextmanager
def task_context(model: nn.Module, index: int) -> Iterator[None]:
    """Run the forwards inside the block as task `index` (0-based) of the run; restored after."""
    mods = conditioned_modules(model)
    before = [m.task_index for m in mods]
    for m in mods:
        m.task_index = int(index)
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.task_index = b


def current_task(model: nn.Module) -> int:
    """The task index the model's task-dependent modules are set to (0 when it has none)."""
    for m in model.modules():
        if isinstance(m, TaskConditioned):
            return m.task_index
    return 0


class TaskHeads(TaskConditioned):
    """One classification head per task, chosen by the current task. `heads.0` is the
    model's own head; the others are built like it with their task's label count."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.task_index](x)


def install_task_heads(model: nn.Module, num_labels: Sequence[int], seed: int = 0) -> None:
    """Replace each classification head (a Linear) of `model` by TaskHeads with one head
    per entry of `num_labels` (task 0 keeps the model's head, which must have num_labels[0]
    outputs). New heads are initialised as transformers does: normal(0, initializer_range)
    weights, zero biases, from a generator seeded by `seed`."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    for name, head in head_modules(model):
        if isinstance(head, TaskHeads):
            raise ValueError("model: task heads are already installed")
        if not isinstance(head, nn.Linear):
            raise ValueError(f"dataset.tasks: the model's head {name!r} is a {type(head).__name__}, "
                             f"not a linear layer; multi-task classification needs one")
        if head.out_features != num_labels[0]:
            raise ValueError(f"model: head {name!r} has {head.out_features} outputs, task 0 has {num_labels[0]} labels")
        g = torch.Generator().manual_seed(seed + 7919)
        heads = [head]
        for n in num_labels[1:]:
            h = nn.Linear(head.in_features, n, bias=head.bias is not None, device=head.weight.device,
                          dtype=head.weight.dtype)
            with torch.no_grad():
                if h.weight.device.type != "meta":
                    h.weight.copy_(torch.randn(h.weight.shape, generator=g) * std)
                    if h.bias is not None:
                        h.bias.zero_()
            h.weight.requires_grad_(head.weight.requires_grad)
            heads.append(h)
        set_submodule(model, name, TaskHeads(heads))


def task_heads(model: nn.Module) -> list[TaskHeads]:
    return [m for m in model.modules() if isinstance(m, TaskHeads)]


def temperature_probs(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """p_i proportional to n_i^(1/T): T=1 samples by size, large T towards uniform."""
    n = np.asarray(sizes, dtype=np.float64)
    if (n <= 0).any():
        raise ValueError("dataset.tasks: every task needs training rows")
    w = n ** (1.0 / float(temperature))
    return w / w.sum()


@dataclass
class TaskSet:
    """The tasks of a multi-task run: names, mapped examples (engine.data.Examples) and
    tokenized splits (engine.tokens.Tokenized), in config order."""

    names: list[str]
    examples: list[Any]
    data: list[Any] = field(default_factory=list)
    temperature: float = 10.0

    def __len__(self) -> int:
        return len(self.names)

    @property
    def labels(self) -> dict[str, list[str]]:
        return {n: list(e.labels) for n, e in zip(self.names, self.examples)}

    @property
    def num_labels(self) -> list[int]:
        return [max(2, e.num_labels) for e in self.examples]


COUNT_KEYS = ("eval_rows", "gen_rows")    # summed over tasks, not averaged


def is_number(v: Any) -> bool:
    """A metric value (int or float, not bool); eval dicts also hold lists (generation `samples`)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def combine_eval(per_task: dict[str, dict]) -> dict:
    """Per-task evaluation dicts -> one dict: `eval/<task>/<key>` for each task's values
    (numbers, and lists such as generation samples), and under the plain names
    (eval_loss, accuracy / perplexity, bleu, ...) the unweighted mean over the tasks that
    have the number (eval_rows, gen_rows: the sum). Non-numbers get no plain name."""
    out: dict[str, Any] = {}
    keys: list[str] = []
    for name, ev in per_task.items():
        for k, v in ev.items():
            out[f"eval/{name}/{k}"] = v
            if k not in keys:
                keys.append(k)
    for k in keys:
        vals = [ev[k] for ev in per_task.values() if is_number(ev.get(k))]
        if not vals:
            continue
        out[k] = int(sum(vals)) if k in COUNT_KEYS else float(sum(vals) / len(vals))
    return out


def task_metric_names(ev: Optional[dict]) -> dict[str, dict[str, Any]]:
    """The inverse of combine_eval's naming: {task: {metric: value}} from an eval dict."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in (ev or {}).items():
        if k.startswith("eval/") and k.count("/") >= 2:
            _, task, metric = k.split("/", 2)
            out.setdefault(task, {})[metric] = v
    return out
