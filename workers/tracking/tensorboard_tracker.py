"""Mirror a run to TensorBoard event files with `torch.utils.tensorboard.SummaryWriter`
(it needs the `tensorboard` package): one log directory per run,
`<STUDIO_TENSORBOARD_DIR or data dir/tensorboard>/run-<id>`, so `tensorboard --logdir`
on the parent shows every run. Scalars carry the step; the params, the end-of-run
summary and the status are text summaries; the adapter zip is copied beside the
events. API: https://pytorch.org/docs/stable/tensorboard.html
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from .buffer import TrackerProblem


def _table(d: dict) -> str:
    rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in d.items())
    return f"| key | value |\n|---|---|\n{rows}"


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, logdir: Path, cfg: dict):
        self.logdir, self.cfg = Path(logdir), cfg
        self.writer = None
        self._last_step = 0

    def start(self, params: dict[str, str]) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=5)
            self.writer.add_text("params", _table(params), 0)
        return {"logdir": str(self.logdir)}

    def _w(self):
        if self.writer is None:
            raise TrackerProblem("not started", "the TensorBoard writer was never opened (see the earlier warning)",
                                 False)
        return self.writer

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        w = self._w()
        for k, v in metrics.items():
            w.add_scalar(k, v, int(step))
        self._last_step = max(self._last_step, int(step))

    def finish(self, status: str, summary: dict[str, Any], artifact_path: Optional[Path]) -> None:
        w = self._w()
        step = int(summary.get("steps_done") or self._last_step)
        for k, v in summary.items():
            if isinstance(v, (int, float)):
                w.add_scalar(k, float(v), step)
        w.add_text("summary", _table({"status": status, **summary}), step)
        if artifact_path is not None:
            shutil.copyfile(artifact_path, self.logdir / Path(artifact_path).name)
        w.flush()
        w.close()
        self.writer = None
