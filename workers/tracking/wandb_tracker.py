"""Mirror a run to Weights & Biases with `wandb.init` (project, entity, mode
online|offline, `dir` = STUDIO_WANDB_DIR or <data dir>/wandb, id
`peft-studio-<run id>` with resume="allow", so a resumed run continues its W&B
run). Several runs may be mirrored from one worker process at once
(reinit="create_new"); console capture, system stats and git probing are off.
Offline runs stay on disk (`wandb sync <dir>/wandb/offline-run-*` uploads them
later) and touch no network. Online mode needs WANDB_API_KEY in the worker's
environment. API: https://docs.wandb.ai/ref/python/init
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .buffer import TrackerProblem, default_classify


class WandbTracker:
    name = "wandb"

    def __init__(self, project: str, entity: Optional[str], mode: str, root: Path, run_id: int, cfg: dict):
        self.project, self.entity, self.mode, self.root = project, entity, mode, Path(root)
        self.studio_run, self.cfg = int(run_id), cfg
        self.run = None

    def classify(self, e: BaseException) -> tuple[str, bool]:
        name = type(e).__name__
        if name in ("CommError", "WaitTimeoutError"):
            return "unreachable", True
        if name in ("UsageError", "AuthenticationError", "AuthorizationError"):
            return f"refused ({name})", False
        return default_classify(e)

    def start(self, params: dict[str, str]) -> dict:
        import wandb

        if self.run is None:
            self.root.mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_machine_info=True,
                                      disable_git=True, save_code=False)
            self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=str(self.root),
                                  id=f"peft-studio-{self.studio_run}", name=str(self.cfg.get("name") or ""),
                                  config=params, resume="allow", reinit="create_new", settings=settings)
        return {"run_id": self.run.id, "project": self.project, "mode": self.mode,
                "dir": str(Path(self.run.dir).parent)}

    def _r(self):
        if self.run is None:
            raise TrackerProblem("not started", "the W&B run was never started (see the earlier warning)", False)
        return self.run

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._r().log(dict(metrics), step=int(step))

    def finish(self, status: str, summary: dict[str, Any], artifact_path: Optional[Path]) -> None:
        import wandb

        run = self._r()
        run.summary.update({**summary, "status": status})
        if artifact_path is not None:
            art = wandb.Artifact(f"peft-studio-run-{self.studio_run}-adapter", type="model")
            art.add_file(str(artifact_path))
            run.log_artifact(art)
        run.finish(exit_code=0 if status == "FINISHED" else 1)
        self.run = None
