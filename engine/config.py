"""The run config: one pydantic schema shared by the UI, REST, CLI and worker.

Unknown keys and impossible values are rejected with a message naming the field
(see `ConfigError`). YAML and JSON both round-trip through `RunConfig`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .methods import MethodConfig, default_learning_rate, parse_method_config

Task = Literal["classification", "causal_lm"]


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the field(s)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"
# HyperFormer (Karimi Mahabadi et al. 2021) samples tasks with p_i ~ n_i^(1/T), T = 10
DEFAULT_TEMPERATURE = 10.0
SINGLE_DATASET_FIELDS = ("name", "path", "validation_path", "text_column", "label_column", "prompt_column",
                         "response_column", "validation_fraction", "max_rows")


class _Source(_Strict):
    path: Optional[str] = Field(None, description="csv / jsonl / parquet file")
    validation_path: Optional[str] = None
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_rows: Optional[int] = Field(None, gt=0)


class TaskDatasetConfig(_Source):
    """One task of a multi-task run: its name and its data, given like a single dataset
    (a bundled dataset under `bundled`, or a file under `path`)."""

    name: str = Field(..., pattern=TASK_NAME, description="the task's name (metrics are eval/<name>/...)")
    bundled: Optional[str] = Field(None, description="bundled dataset: demo-sentiment | demo-instruct")

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.bundled) == bool(self.path):
            raise ValueError(f"task {self.name!r}: give exactly one of bundled or path")
        return self

    def as_dataset(self) -> "DatasetConfig":
        """This task's data as a single-dataset section (what engine.data reads)."""
        fields = self.model_dump(exclude={"name", "bundled"}, exclude_unset=True)
        return DatasetConfig(name=self.bundled, **fields)


class DatasetConfig(_Source):
    name: Optional[str] = Field(None, description="bundled dataset: demo-sentiment | demo-instruct")
    tasks: Optional[list[TaskDatasetConfig]] = Field(
        None, description="a multi-task run: two or more datasets, one task each; batches are drawn from one "
                          "task at a time, with probability proportional to its rows^(1/temperature)")
    temperature: Optional[float] = Field(None, ge=1.0, le=1000.0,
                                         description=f"multi-task sampling temperature T (default "
                                                     f"{DEFAULT_TEMPERATURE:g}; 1: proportional to size)")

    @model_validator(mode="after")
    def _one_source(self):
        if self.tasks is not None:
            given = [f for f in SINGLE_DATASET_FIELDS if getattr(self, f) != type(self).model_fields[f].default]
            if given:
                raise ValueError(f"dataset.{given[0]}: not with dataset.tasks (give it inside each task)")
            if len(self.tasks) < 2:
                raise ValueError("dataset.tasks: a multi-task run needs at least two tasks "
                                 "(for one dataset, give dataset.name or dataset.path)")
            names = [t.name for t in self.tasks]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"dataset.tasks: task name {dup[0]!r} is used twice; names must be unique")
            return self
        if self.temperature is not None:
            raise ValueError("dataset.temperature: only with dataset.tasks")
        if bool(self.name) == bool(self.path):
            raise ValueError("give exactly one of dataset.name (bundled) or dataset.path (file)")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks] if self.tasks else []

    @property
    def sampling_temperature(self) -> float:
        return self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE

    def sources(self) -> list["DatasetConfig"]:
        """The single-dataset sections of this run: itself, or one per task."""
        return [t.as_dataset() for t in self.tasks] if self.tasks else [self]

    def file_paths(self) -> list[tuple[str, str]]:
        """(field, path) of every file this section names, for checks at submit time."""
        out = []
        for i, src in enumerate(self.sources()):
            for f in ("path", "validation_path"):
                if getattr(src, f):
                    out.append((f"dataset.tasks.{i}.{f}" if self.tasks else f"dataset.{f}", getattr(src, f)))
        return out

    def label(self) -> str:
        """A short description for messages: the bundled name, the file name, or the task names."""
        if self.tasks:
            return "tasks " + ", ".join(self.task_names)
        return self.name or Path(self.path).name


class DistributedConfig(_Strict):
    """One run over several processes (engine.distributed): `ddp` replicates the model
    and averages gradients; `fsdp` shards weights, gradients and optimizer states."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    world_size: int = Field(1, ge=1, le=1024, description="processes (one per device); 1: no process group")


class TrainingConfig(_Strict):
    max_steps: Optional[int] = Field(30, gt=0, le=10_000_000)
    epochs: Optional[float] = Field(None, gt=0, le=10_000)
    batch_size: int = Field(8, gt=0, le=4096)
    grad_accum: int = Field(1, gt=0, le=1024)
    learning_rate: Optional[float] = Field(None, gt=0, le=10, description="null or left out: the method's "
                                           "default (MethodSpec.default_lr, measured in bench/default_lr.py)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    max_seq_len: int = Field(64, gt=0, le=131072)
    eval_every: int = Field(10, ge=0)
    eval_batches: Optional[int] = Field(None, gt=0)
    eval_max_rows: Optional[int] = Field(None, gt=0, description="evaluate on at most this many validation rows "
                                         "(a sample drawn by the seed); null or left out: 2,000 on CUDA, on a "
                                         "CPU a sixth of the rows trained on (at least 32; engine.phases)")
    eval_full: bool = Field(False, description="the final evaluation scores every validation row")
    packing: bool = Field(False, description="causal LM: concatenate examples up to max_seq_len, attention "
                          "kept inside each example")
    group_by_length: bool = Field(False, description="batch rows of similar length together (less padding)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16. Under bf16/fp16 the frozen base "
                            "weights are loaded straight to the device in that dtype, trainable parameters and their "
                            "optimizer states are fp32, matmuls run under autocast; fp16 adds loss scaling "
                            "(docs/precision.md)")
    compile: Union[bool, Literal["cudagraphs"]] = Field(
        False, description="torch.compile each transformer block (engine.compile): fewer kernel launches per "
                           "step, after a first step that compiles; 'cudagraphs' also replays each compiled block "
                           "as a CUDA graph (CUDA only); CUDA is where either pays")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0: never)")
    retries: int = Field(0, ge=0, le=10, description="requeue a run whose worker died, resuming from its checkpoint")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (fp32 states) | adamw_8bit (block-wise 8-bit states, engine.optim) | "
                            "paged_adamw_8bit (8-bit states kept in host memory)")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval_generate: int = Field(8, ge=0, le=100_000, description="causal LM: at each evaluation decode this many "
                               "validation prompts greedily and score BLEU, ROUGE-L and exact match (0: off)")
    eval_generate_tokens: int = Field(32, gt=0, le=4096, description="the most new tokens decoded per prompt "
                                      "for the generation metrics")

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.epochs is not None and "max_steps" not in self.model_fields_set:
            self.max_steps = None
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give training.max_steps or training.epochs")
        return self


Metric = Literal["eval_loss", "perplexity", "accuracy", "bleu", "rouge_l", "exact_match"]
# (metric, higher is better); generation metrics need task causal_lm and training.eval_generate > 0
METRIC_DIRECTION = {"eval_loss": False, "perplexity": False, "accuracy": True, "bleu": True, "rouge_l": True,
                    "exact_match": True}
GENERATION_METRICS = ("bleu", "rouge_l", "exact_match")
TASK_METRICS = {"classification": ("eval_loss", "accuracy"),
                "causal_lm": ("eval_loss", "perplexity") + GENERATION_METRICS}


class WandbConfig(_Strict):
    project: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    entity: Optional[str] = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    mode: Literal["online", "offline"] = "online"


class TrackingConfig(_Strict):
    """Mirror the run to experiment trackers (workers.tracking). Each is also set for
    every run by the worker's settings (STUDIO_MLFLOW_URI, STUDIO_TENSORBOARD_DIR,
    STUDIO_WANDB_PROJECT); a run's own section wins."""

    mlflow: Optional[str] = Field(None, min_length=1, max_length=2000,
                                  description="an MLflow tracking URI: http(s)://host:port, or file:/path")
    tensorboard: Optional[bool] = Field(None, description="write TensorBoard event files for the run")
    wandb: Optional[WandbConfig] = None

    @field_validator("mlflow")
    @classmethod
    def _mlflow_uri(cls, v: Optional[str]):
        if v is not None and not re.match(r"^(https?|file|databricks)://|^file:/", v):
            raise ValueError("must be an MLflow tracking URI (http://host:port, https://..., file:/path)")
        if v is not None and re.match(r"^[a-z]+://[^/]*@", v):
            # a run's config is shown in the UI and stored in the database: no secrets in it
            raise ValueError("holds credentials; give them to the worker as MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        return v


# ------------------------------------------------------------------ text fields
# Every string of a run config (name, model, dataset names, paths and column names, target
# modules, method options, and their keys) is an identifier, not prose: it refuses control
# characters (C0 U+0000-U+001F, DEL, C1 U+0080-U+009F) and lone surrogates (JSON can spell
# "\ud800", UTF-8 cannot). PostgreSQL stores no NUL in a text column and neither database
# driver encodes a surrogate, so the same config was a 201 on SQLite and a 500 on PostgreSQL.
# Prose, a field whose key ends in `_text` (prompt tuning's init_text), may also hold tab,
# newline and carriage return. Checked before pydantic, so CLI, REST, UI and worker agree.
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NOT_PROSE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_FIELD_MESSAGE = re.compile(r"^[A-Za-z_][\w.]*: ")


def text_problem(value: str, prose: bool = False) -> Optional[str]:
    """Why `value` cannot be a text field (None if it can): the first control character
    or lone surrogate, and where it is."""
    m = (_NOT_PROSE if prose else _NOT_TEXT).search(value)
    if m is None:
        return None
    ch = m.group()
    kind = "a lone surrogate (not valid Unicode)" if 0xD800 <= ord(ch) <= 0xDFFF else "a control character"
    return (f"contains {kind} ({ch!r}, U+{ord(ch):04X}) at position {m.start()}; text fields take printable "
            f"characters" + (", tab and newline only" if prose else " only"))


def check_text_fields(value: Any, path: str = "", prose: bool = False) -> None:
    """Raise ConfigError naming the first string (value or key) under `value` that holds
    a control character or lone surrogate."""
    if isinstance(value, str):
        why = text_problem(value, prose)
        if why:
            raise ConfigError(f"{path or 'config'}: {why}")
    elif isinstance(value, dict):
        for k, v in value.items():
            key = str(k)
            if _NOT_TEXT.search(key):
                raise ConfigError(f"{path or 'config'}: key {key[:50]!r} {text_problem(key)}")
            check_text_fields(v, f"{path}.{key}" if path else key, key.endswith("_text"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text_fields(v, f"{path}.{i}", prose)


class RunConfig(_Strict):
    name: str = Field("run", min_length=1, max_length=200)
    model: str = Field(..., min_length=1, max_length=500, description="bundled name, local directory, or hub id")
    task: Task = "classification"
    dataset: DatasetConfig
    method: SerializeAsAny[MethodConfig]
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    metric: Optional[Metric] = Field(None, description="the metric that ranks the run (its best metric): "
                                     "eval_loss | perplexity | accuracy | bleu | rouge_l | exact_match; "
                                     "default accuracy for classification, eval_loss for causal_lm")
    tracking: Optional[TrackingConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _text_fields(cls, data: Any):
        check_text_fields(data)   # a ConfigError is a ValueError: pydantic reports it (loc: config)
        return data

    @model_validator(mode="after")
    def _packing_task(self):
        if self.training.packing and self.task != "causal_lm":
            raise ValueError("training.packing: only for task causal_lm")
        if self.training.packing and self.training.group_by_length:
            raise ValueError("training.group_by_length: not with training.packing (packs are already full)")
        return self

    @model_validator(mode="after")
    def _metric_task(self):
        if self.metric is None:
            return self
        if self.metric not in TASK_METRICS[self.task]:
            raise ValueError(f"metric: {self.metric!r} is not a {self.task} metric (one of "
                             f"{', '.join(TASK_METRICS[self.task])})")
        if self.metric in GENERATION_METRICS and not self.training.eval_generate:
            raise ValueError(f"metric: {self.metric!r} needs training.eval_generate > 0 (it is 0: no generation)")
        return self

    @property
    def metric_name(self) -> str:
        """The metric that ranks this run."""
        return self.metric or ("accuracy" if self.task == "classification" else "eval_loss")

    @model_validator(mode="after")
    def _default_learning_rate(self):
        # left out (or null): the method's measured default, written into the config so that
        # the stored run says what it trained with; a given rate is kept as it is
        if self.training.learning_rate is None:
            self.training.learning_rate = default_learning_rate(self.method.name)
        return self

    @model_validator(mode="after")
    def _method_tasks(self):
        # a method whose config depends on the number of tasks declares `n_tasks`
        if "n_tasks" in type(self.method).model_fields:
            n = len(self.dataset.tasks) if self.dataset.tasks else 1
            if "n_tasks" not in self.method.model_fields_set:
                self.method.n_tasks = n
            elif self.method.n_tasks != n:
                raise ValueError(f"method.n_tasks: {self.method.n_tasks} does not match the run's {n} task(s) "
                                 f"(leave it out: it follows dataset.tasks)")
        return self

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any):
        try:
            return parse_method_config(v)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, prefix="method.")) from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if loc == "method" and msg.startswith("method"):
            parts.append(msg)
            continue
        if not loc and _FIELD_MESSAGE.match(msg):   # a whole-config check whose message names the field
            parts.append(f"{prefix}{msg}")
            continue
        parts.append(f"{prefix}{loc or 'config'}: {msg}")
    return "; ".join(parts)


def parse_run_config(data: Any) -> RunConfig:
    """Validate a mapping into a RunConfig, raising ConfigError with field names."""
    if isinstance(data, RunConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError("config: must be a mapping")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    except ValueError as e:   # raised by parse_method_config outside pydantic's wrapping
        raise ConfigError(str(e)) from None


def load_run_config(path: str | Path) -> RunConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file is not UTF-8 text: {p}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    return parse_run_config(data)
