"""Mirror a run to an MLflow tracking server with the low-level client
(`mlflow.tracking.MlflowClient`, from mlflow-skinny): one MLflow run per studio
run in the experiment STUDIO_MLFLOW_EXPERIMENT (default "peft-studio"), params
by `log_batch` (at most 100 per call), metrics with their step, the end-of-run
summary as metrics and tags, the adapter zip under the artifact path `adapter`,
and the terminal status (`set_terminated`: FINISHED, FAILED, KILLED).
API: https://mlflow.org/docs/latest/python_api/mlflow.client.html

The client's own HTTP retries are turned off by default (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0,
MLFLOW_HTTP_REQUEST_TIMEOUT=10 unless the worker's environment sets them): the buffer
retries with its own bounded backoff, so a call never hangs for minutes. Credentials
come only from the worker's environment (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from .buffer import TrackerProblem, default_classify, redact

MAX_PARAMS_PER_CALL = 100
MAX_METRICS_PER_CALL = 1000
MAX_PARAM_VALUE = 6000           # the server's limit on a param value (MLflow >= 2.x)
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


class MlflowTracker:
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_id: int, cfg: dict, previous: Optional[dict] = None):
        self.uri, self.experiment, self.studio_run, self.cfg = uri, experiment, int(run_id), cfg
        self.client = None
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._params_done = False
        self._last_step = 0
        prev = previous or {}
        if prev.get("run_id") and prev.get("uri") == redact(uri):   # a resumed run continues its MLflow run
            self.run_id, self.experiment_id, self._params_done = prev["run_id"], prev.get("experiment_id"), True
            self._resumed = True
        else:
            self._resumed = False

    def _client(self):
        if self.client is None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    def classify(self, e: BaseException) -> tuple[str, bool]:
        code = getattr(e, "error_code", None)
        if code is None:
            return default_classify(e)
        text = str(e)
        if "Failed to establish a new connection" in text or "Max retries exceeded" in text or "timed out" in text:
            return "unreachable", True
        if code in TRANSIENT_CODES:
            return f"server error {code}", True
        return f"refused ({code})", False

    def _experiment(self, c) -> str:
        exp = c.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(self.experiment)
        except Exception as e:   # another worker created it meanwhile
            if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            return c.get_experiment_by_name(self.experiment).experiment_id

    def start(self, params: dict[str, str]) -> dict:
        from mlflow.entities import Param

        c = self._client()
        if self.run_id is None:
            self.experiment_id = self._experiment(c)
            tags = {"peft_studio.run_id": str(self.studio_run), "peft_studio.model": str(self.cfg.get("model")),
                    "peft_studio.method": str((self.cfg.get("method") or {}).get("name")),
                    "peft_studio.task": str(self.cfg.get("task"))}
            run = c.create_run(self.experiment_id, run_name=str(self.cfg.get("name") or f"run-{self.studio_run}"),
                               tags=tags)
            self.run_id = run.info.run_id
        elif self._resumed:
            c.update_run(self.run_id, status="RUNNING")
        if not self._params_done:
            items = [Param(k[:250], v[:MAX_PARAM_VALUE]) for k, v in params.items()]
            for i in range(0, len(items), MAX_PARAMS_PER_CALL):
                c.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_CALL], synchronous=True)
            self._params_done = True
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "uri": redact(self.uri)}

    def _need_run(self) -> str:
        if self.run_id is None:
            raise TrackerProblem("not started", "the MLflow run was never created (see the earlier warning)", False)
        return self.run_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        rid = self._need_run()
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_CALL):
            self._client().log_batch(rid, metrics=items[i:i + MAX_METRICS_PER_CALL], synchronous=True)
        self._last_step = max(self._last_step, int(step))

    def finish(self, status: str, summary: dict[str, Any], artifact_path: Optional[Path]) -> None:
        from mlflow.entities import Metric, RunTag

        rid, c = self._need_run(), self._client()
        step = int(summary.get("steps_done") or self._last_step)
        now = int(time.time() * 1000)
        nums = [Metric(k, float(v), now, step) for k, v in summary.items() if isinstance(v, (int, float))]
        tags = [RunTag(f"peft_studio.{k}", str(v)[:5000]) for k, v in summary.items() if isinstance(v, str)]
        c.log_batch(rid, metrics=nums, tags=tags, synchronous=True)
        if artifact_path is not None:
            c.log_artifact(rid, str(artifact_path), artifact_path="adapter")
        c.set_terminated(rid, status=status)
