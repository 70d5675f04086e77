"""What a run is doing, in words, and how long the rest will take.

A run goes through phases: loading the model (and, once, converting a bundled GGUF
model to safetensors), reading and tokenizing its data, training, evaluating (scoring
validation rows, then generating answers for the generation metrics), and, in the
studio, saving and uploading the adapter. The engine reports them through an
`on_phase(text)` callback (engine.prepare.prepare_run, engine.train.train); the worker
stores the text as the run's `phase`, the CLI prints it on its progress bar.

`Eta` is the remaining time of the training loop counting its evaluations: the
measured seconds per step times the steps left, plus the evaluations still to come,
each as long as the ones measured so far (before the first one: a guess from the step
time, see `guess_eval_s`).

`eval_rows_bound` is the number of validation rows an evaluation scores when the config
leaves `training.eval_max_rows` unset: on CUDA 2,000; on a CPU a sixth of the rows the
run trains on (at least 32), which keeps the final evaluation near a tenth of the
training time (bench/RESULTS-eval-budget.md)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

Phase = Callable[[str], None]

GPU_EVAL_ROWS = 2000          # rows scored by default on CUDA (the schema's old fixed default)
CPU_EVAL_MIN_ROWS = 32        # at least this many on a CPU
CPU_EVAL_ROWS_PER_TRAIN_ROW = 1 / 6
# Costs relative to one training step of the same batch, for the ETA before an evaluation
# was measured: a no-grad forward of a batch (MiniLM 0.3, SmolLM2 0.55 on CPU), one decode
# step of a batch with the KV cache (SmolLM2 on CPU: 0.02).
EVAL_BATCH_COST = 0.5
DECODE_STEP_COST = 0.03


def loading(model: str) -> str:
    return f"loading model {model}"


def converting(model: str) -> str:
    return f"converting {model} to safetensors (once; later runs load the converted copy)"


def training(step: int, steps: int) -> str:
    return f"training: step {step} / {steps}"


def evaluating(done: int, total: int, task: str = "") -> str:
    return f"evaluating{' ' + task if task else ''}: {done:,} / {total:,} rows"


def generating(done: int, total: int, task: str = "") -> str:
    return f"evaluating{' ' + task if task else ''}: generating {done:,} / {total:,} answers"


SAVING = "saving the adapter"
UPLOADING = "uploading the adapter to the artifact store"


def eval_rows_bound(eval_max_rows: Optional[int], steps: int, batch_size: int, grad_accum: int,
                    device_type: str) -> int:
    """The most validation rows one evaluation scores: `training.eval_max_rows` when the
    config gives it, else 2,000 on CUDA, and on a CPU a sixth of the rows the run trains
    on (steps x batch x accumulation), at least 32 and at most 2,000."""
    if eval_max_rows is not None:
        return int(eval_max_rows)
    if device_type == "cuda":
        return GPU_EVAL_ROWS
    trained = steps * batch_size * grad_accum
    return int(min(GPU_EVAL_ROWS, max(CPU_EVAL_MIN_ROWS, round(trained * CPU_EVAL_ROWS_PER_TRAIN_ROW))))


def eval_steps(start_step: int, steps: int, every: int) -> list[int]:
    """The steps after `start_step` (up to `steps`) that end with an evaluation: every
    `every`-th, and the last one."""
    out = [s for s in range(start_step + 1, steps + 1) if every and s % every == 0]
    if steps > start_step and (not out or out[-1] != steps):
        out.append(steps)
    return out


def guess_eval_s(step_s: float, rows: int, batch_size: int, answers: int = 0, new_tokens: int = 0) -> float:
    """An evaluation's seconds before any was measured, from the seconds of one training
    step: a forward per batch of rows, and a decode step per batch of answers per token."""
    b = max(1, batch_size)
    return step_s * (EVAL_BATCH_COST * -(-rows // b) + DECODE_STEP_COST * -(-answers // b) * new_tokens)


class Eta:
    """Seconds left in the training loop, its evaluations included."""

    def __init__(self, start_step: int, steps: int, eval_at: list[int], guess: Callable[[float, bool], float],
                 final_ratio: float = 1.0):
        """`eval_at`: the steps that end with an evaluation; `guess(step_s, final)`: an
        evaluation's seconds before one was measured; `final_ratio`: the final evaluation's
        rows over the others' (more with training.eval_full)."""
        self.start, self.steps, self.eval_at = start_step, steps, list(eval_at)
        self.guess, self.final_ratio = guess, final_ratio
        self.train_s = 0.0
        self.evals: list[float] = []

    def add_step(self, seconds: float) -> None:
        self.train_s += seconds

    def add_eval(self, seconds: float) -> None:
        self.evals.append(seconds)

    def left(self, step: int) -> float:
        """Seconds left after step `step` (and its evaluation, if any) has finished."""
        done = step - self.start
        if done <= 0 or step >= self.steps:
            return 0.0
        step_s = self.train_s / done
        rest = step_s * (self.steps - step)
        mean = sum(self.evals) / len(self.evals) if self.evals else None
        for s in self.eval_at:
            if s > step:
                final = s == self.steps
                rest += self.guess(step_s, final) if mean is None else mean * (self.final_ratio if final else 1.0)
        return rest


def run_eta(t, start_step: int, steps: int, max_rows: int, n_answers: int, val_sizes: Sequence[int]) -> Eta:
    """The Eta of a training loop: training config `t`, evaluations of at most `max_rows`
    rows of each validation split in `val_sizes` (every row at the end with eval_full), and
    `n_answers` generated answers per evaluation."""
    from .batching import eval_sample

    def rows(final: bool) -> int:
        return sum(len(eval_sample(n, None if final and t.eval_full else max_rows, t.seed)) for n in val_sizes)

    every, final = rows(False), rows(True)
    return Eta(start_step, steps, eval_steps(start_step, steps, t.eval_every),
               lambda step_s, last: guess_eval_s(step_s, final if last else every, t.batch_size, n_answers,
                                                 t.eval_generate_tokens),
               final_ratio=final / max(1, every))
