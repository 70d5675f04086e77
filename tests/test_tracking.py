"""Runs mirrored to experiment trackers (workers.tracking), through the real worker code
path (workers.tasks.execute_run) and read back with each tracker's own reader:
a real `mlflow server` (SQLite backend, a free port) read through MlflowClient,
TensorBoard event files read with tbparse, a W&B offline run's .wandb file read
with wandb's own protobuf records. A tracker that is down neither fails nor
slows a run (bounded flush, a warning naming it), and one that comes up mid-run
receives what was buffered. Migration 0006 on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from conftest import free_port, require, stop_groups, wait_http

EXPERIMENT = "peft-studio"
BERT = {"name": "tracked-bert", "model": "tiny-bert", "task": "classification",
        "dataset": {"name": "demo-sentiment", "max_rows": 32},
        "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["query"]},
        "training": {"max_steps": 4, "batch_size": 4, "max_seq_len": 16, "eval_every": 2, "eval_batches": 1}}
LLAMA = {"name": "tracked-llama", "model": "tiny-llama", "task": "causal_lm", "metric": "bleu",
         "dataset": {"name": "demo-instruct", "max_rows": 32},
         "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
         "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 32, "eval_every": 2,
                      "eval_batches": 1, "eval_generate": 2, "eval_generate_tokens": 4}}


# ------------------------------------------------------------------ the MLflow server

@pytest.fixture(scope="module")
def _mlflow_process(tmp_path_factory):
    """`mlflow server` started at once (it takes a while to come up on a busy machine);
    `mlflow_server` waits for it. Killed (its whole process group) after the module."""
    require("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield {"proc": proc, "port": port, "uri": f"http://127.0.0.1:{port}", "log": root / "server.log"}
    stop_groups([proc])
    log.close()


@pytest.fixture(scope="module")
def mlflow_server(_mlflow_process):
    try:
        wait_http(_mlflow_process["uri"] + "/health", timeout=300, proc=_mlflow_process["proc"])
    except Exception as e:
        pytest.fail(f"mlflow server did not come up: {e}\n{_mlflow_process['log'].read_text()[-3000:]}")
    return _mlflow_process


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------ helpers

@contextlib.contextmanager
def worker_env(tmp: Path, **env):
    """Settings of a fresh data dir (SQLite at head, a file:// store) with `env` set, as a
    worker would have them; usable from module-scoped fixtures."""
    from studio.runtime import prepare_database
    from workers.settings import load_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp / "data"))
        mp.setenv("STUDIO_ARTIFACT_URL", (tmp / "store").as_uri())
        for var in ("STUDIO_DATABASE_URL", "STUDIO_BROKER_URL", "STUDIO_MLFLOW_URI", "STUDIO_TENSORBOARD_DIR",
                    "STUDIO_WANDB_PROJECT", "STUDIO_WANDB_MODE"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for k, v in env.items():
            mp.setenv(k, str(v))
        s = load_settings()
        prepare_database(s)
        yield s


def train(settings, cfg: dict) -> dict:
    """Submit and execute `cfg` in this process; the run (with `metrics` and `wall_s`)."""
    from studio import service
    from workers.tasks import execute_run

    rid = service.submit_run(settings, cfg)
    t0 = time.monotonic()
    status = execute_run(rid, settings)
    wall = time.monotonic() - t0
    run = service.get_run(settings, rid)
    assert status == "succeeded", run["error"]
    return {**run, "metrics": service.get_metrics(settings, rid), "wall_s": wall, "settings": settings}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def expected_metrics(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{metric name: {step: value}} the trackers must hold, from our metrics rows."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        for k in ("loss", "lr", "tokens_per_s", "epoch"):
            if r[k] is not None:
                out.setdefault(f"train/{k}", {})[r["step"]] = r[k]
        for k, v in (r["eval"] or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k if k.startswith("eval/") else f"eval/{k}", {})[r["step"]] = v
    return out


def mlflow_history(c, run_id: str, names) -> dict[str, dict[int, float]]:
    return {n: {m.step: m.value for m in c.get_metric_history(run_id, n)} for n in names}


def adapter_bytes(run: dict) -> bytes:
    from workers.store import get_store

    ad = run["adapter"]
    return get_store(run["settings"]).get_file(ad["key"], ad["sha256"]).read_bytes()


def finished_at(run: dict) -> float:
    return dt.datetime.fromisoformat(run["finished_at"]).timestamp()


# ------------------------------------------------------------------ runs shared by the tests below

@pytest.fixture(scope="module")
def bert_run(mlflow_server, tmp_path_factory):
    """tiny-bert classification mirrored to all three trackers by its own `tracking` section."""
    require("tbparse")
    require("wandb")
    cfg = {**BERT, "tracking": {"mlflow": mlflow_server["uri"], "tensorboard": True,
                                "wandb": {"project": "studio-tests", "mode": "offline"}}}
    with worker_env(tmp_path_factory.mktemp("bert"), STUDIO_TRACKING_FLUSH_S=120) as s:
        return train(s, cfg)


@pytest.fixture(scope="module")
def llama_run(mlflow_server, tmp_path_factory):
    """tiny-llama causal LM with generation metrics, mirrored by the worker's STUDIO_MLFLOW_URI alone."""
    with worker_env(tmp_path_factory.mktemp("llama"), STUDIO_MLFLOW_URI=mlflow_server["uri"],
                    STUDIO_TRACKING_FLUSH_S=120) as s:
        return train(s, LLAMA)


# ------------------------------------------------------------------ a tracker that is down (no server needed)

def test_a_tracker_that_is_down_neither_fails_nor_holds_up_the_run(tmp_path, _mlflow_process, monkeypatch):
    from workers.tracking import Mirror

    port = free_port()                                 # nothing listens there
    steps = 8
    cfg = {**BERT, "name": "down", "training": {**BERT["training"], "max_steps": steps, "eval_every": 0},
           "tracking": {"mlflow": f"http://127.0.0.1:{port}"}}
    tried: list[str] = []                              # the threads that tried to reach the dead tracker
    connect = socket.socket.connect

    def watched(sock, address):
        if isinstance(address, tuple) and len(address) >= 2 and address[1] == port:
            tried.append(threading.current_thread().name)
        return connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", watched)
    in_mirror: list[float] = []                        # seconds the training thread spent handing each step over
    log_step = Mirror.log_step

    def timed(self, row):
        t0 = time.perf_counter()
        log_step(self, row)
        in_mirror.append(time.perf_counter() - t0)
    monkeypatch.setattr(Mirror, "log_step", timed)
    with worker_env(tmp_path, STUDIO_TRACKING_FLUSH_S=2) as s:
        run = train(s, cfg)
    assert run["status"] == "succeeded" and run["adapter"] is not None
    assert [m["step"] for m in run["metrics"]] == list(range(1, steps + 1)) and len(in_mirror) == steps
    # the tracker was tried, only ever from its own background thread: training made no network call
    assert tried and set(tried) == {"tracker-mlflow"}, sorted(set(tried))
    # handing the steps to the mirror took a sliver of the training loop's own time (both measured in
    # this process, so a busy machine slows both alike); a tracker that blocked each step would take most
    assert sum(in_mirror) < 0.1 * run["duration_s"], (in_mirror, run["duration_s"])
    msgs = [w["message"] for w in run["warnings"]]
    assert msgs and all(m.startswith("mlflow:") for m in msgs), msgs
    # the run's end waited the bounded flush, then gave up on what was still buffered
    assert any("gave up" in m and "not delivered" in m for m in msgs), msgs
    assert len(msgs) == len(set(msgs)) <= 3, msgs        # once per problem kind, not once per step
    assert all(dt.datetime.fromisoformat(w["at"]) for w in run["warnings"])
    assert "mlflow" not in (run["tracking"] or {})      # never reached: nothing to link to


# ------------------------------------------------------------------ MLflow

def test_mlflow_holds_params_metrics_estimate_memory_adapter_and_status(bert_run, mlflow_server):
    c = client(mlflow_server["uri"])
    info = bert_run["tracking"]["mlflow"]
    assert info["uri"] == mlflow_server["uri"]
    mrun = c.get_run(info["run_id"])
    assert mrun.info.status == "FINISHED"
    assert c.get_experiment(mrun.info.experiment_id).name == EXPERIMENT == \
        c.get_experiment(info["experiment_id"]).name
    assert mrun.data.params == flatten(bert_run["config"])
    assert mrun.data.params["method.r"] == "2" and mrun.data.params["training.max_steps"] == "4"
    assert mrun.data.tags["peft_studio.run_id"] == str(bert_run["id"])
    want = expected_metrics(bert_run["metrics"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/accuracy", "eval/eval_loss"} <= set(want)
    got = mlflow_history(c, info["run_id"], want)
    for name, per_step in want.items():
        assert got[name] == pytest.approx(per_step, rel=1e-9), name
    assert sorted(got["train/loss"]) == [1, 2, 3, 4]
    # the estimate (the worker's own device kind) and the measured peak, at the end
    m = mrun.data.metrics
    for row, v in bert_run["estimate"]["rows"].items():
        assert m[f"estimate/{row}"] == pytest.approx(v), row
    assert m["measured_peak_bytes"] == bert_run["measured_peak_bytes"] > 0
    assert mrun.data.tags["peft_studio.memory_kind"] == bert_run["memory_kind"]
    # the adapter zip, byte for byte
    arts = [a.path for a in c.list_artifacts(info["run_id"], "adapter")]
    assert arts == [f"adapter/peft-studio-run-{bert_run['id']}-adapter.zip"]
    local = c.download_artifacts(info["run_id"], arts[0], str(bert_run["settings"].data_dir / "dl"))
    assert Path(local).read_bytes() == adapter_bytes(bert_run)
    assert not bert_run["warnings"]


def test_the_workers_setting_mirrors_a_run_without_a_tracking_section(llama_run, mlflow_server):
    assert "tracking" not in llama_run["config"]
    c = client(mlflow_server["uri"])
    mrun = c.get_run(llama_run["tracking"]["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.params == flatten(llama_run["config"])
    want = expected_metrics(llama_run["metrics"])
    assert {"eval/bleu", "eval/rouge_l", "eval/exact_match", "eval/gen_rows"} <= set(want), llama_run["metrics"]
    assert not any("samples" in k for k in want)
    assert any(isinstance((r["eval"] or {}).get("samples"), list) for r in llama_run["metrics"])  # skipped, not lost
    got = mlflow_history(c, mrun.info.run_id, want)
    for name, per_step in want.items():
        assert got[name] == pytest.approx(per_step, rel=1e-9), name
    assert not any("samples" in k for k in mrun.data.metrics)


class Forwarder:
    """A TCP port that starts forwarding to another: the 'server' behind it comes up."""

    def __init__(self, port: int, target: int):
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


def test_a_server_that_comes_up_mid_run_receives_what_was_buffered(mlflow_server, tmp_path):
    from studio import service
    from workers.tasks import execute_run

    port = free_port()
    cfg = {**BERT, "name": "late-server", "training": {**BERT["training"], "max_steps": 6, "eval_every": 3},
           "tracking": {"mlflow": f"http://127.0.0.1:{port}"}}
    with worker_env(tmp_path, STUDIO_TRACKING_FLUSH_S=120) as s:
        rid = service.submit_run(s, cfg)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("status", execute_run(rid, s)))
        t.start()
        deadline = time.monotonic() + 300
        while not service.get_metrics(s, rid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.get_metrics(s, rid), "no step was recorded"
        came_up = time.time()
        fwd = Forwarder(port, mlflow_server["port"])
        try:
            t.join(600)
        finally:
            fwd.close()
        run, rows = service.get_run(s, rid), service.get_metrics(s, rid)
    assert out["status"] == "succeeded", run["error"]
    assert came_up < finished_at(run)                   # it came up while the run was training
    assert any(w["message"].startswith("mlflow:") and "unreachable" in w["message"] for w in run["warnings"])
    c = client(mlflow_server["uri"])
    mrun = c.get_run(run["tracking"]["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED"
    want = expected_metrics(rows)
    got = mlflow_history(c, mrun.info.run_id, want)
    for name, per_step in want.items():
        assert got[name] == pytest.approx(per_step, rel=1e-9), name
    assert sorted(got["train/loss"]) == list(range(1, 7))


# ------------------------------------------------------------------ TensorBoard

def test_tensorboard_event_files_hold_our_metrics(bert_run):
    from tbparse import SummaryReader

    logdir = Path(bert_run["tracking"]["tensorboard"]["logdir"])
    assert logdir == bert_run["settings"].data_dir / "tensorboard" / f"run-{bert_run['id']}"
    assert list(logdir.glob("events.out.tfevents.*"))
    df = SummaryReader(str(logdir)).scalars
    got: dict[str, dict[int, float]] = {}
    for tag, step, value in zip(df["tag"], df["step"], df["value"]):
        got.setdefault(tag, {})[int(step)] = float(value)
    for name, per_step in expected_metrics(bert_run["metrics"]).items():
        assert got[name] == pytest.approx(per_step, rel=1e-6), name      # event files keep float32
    assert got["measured_peak_bytes"][4] == pytest.approx(bert_run["measured_peak_bytes"], rel=1e-6)
    assert got["estimate/total"][4] == pytest.approx(bert_run["estimate"]["rows"]["total"], rel=1e-6)
    assert (logdir / f"peft-studio-run-{bert_run['id']}-adapter.zip").read_bytes() == adapter_bytes(bert_run)


# ------------------------------------------------------------------ Weights & Biases (offline)

def wandb_records(path: Path):
    """The records of a .wandb file (LevelDB log format: 7-byte file header ':W&B', magic,
    version; 32 KiB blocks of chunks with a 7-byte header crc32, length, type
    full/first/middle/last), parsed with wandb's own protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def item_key(item) -> str:
    """A record item's name: `key`, or its `nested_key` parts joined by '/'."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_our_metrics(bert_run):
    info = bert_run["tracking"]["wandb"]
    assert info["mode"] == "offline" and info["run_id"] == f"peft-studio-{bert_run['id']}"
    run_dir = Path(info["dir"])
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-")
    assert run_dir.is_relative_to(bert_run["settings"].data_dir / "wandb")
    history: dict[str, dict[int, float]] = {}
    summary, exit_codes, config = {}, [], {}
    for rec in wandb_records(run_dir / f"run-{info['run_id']}.wandb"):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {item_key(i): json.loads(i.value_json) for i in rec.history.item}
            for k, v in row.items():
                history.setdefault(k, {})[int(row["_step"])] = v
        elif kind == "summary":
            summary.update({item_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "exit":
            exit_codes.append(rec.exit.exit_code)
        elif kind == "run":
            config = {item_key(i): json.loads(i.value_json) for i in rec.run.config.update}
    for name, per_step in expected_metrics(bert_run["metrics"]).items():
        assert history[name] == pytest.approx(per_step, rel=1e-9), name
    assert summary["measured_peak_bytes"] == bert_run["measured_peak_bytes"]
    assert summary["status"] == "FINISHED" and exit_codes == [0]
    assert config["method.r"] == "2"


# ------------------------------------------------------------------ which trackers, and a missing package

def test_a_runs_section_wins_over_the_workers_settings_tracker_by_tracker(tmp_path):
    from workers.settings import load_settings
    from workers.tracking import plan, tracking_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
        mp.setenv("STUDIO_MLFLOW_URI", "http://127.0.0.1:1")
        mp.setenv("STUDIO_TENSORBOARD_DIR", str(tmp_path / "tb"))
        mp.setenv("STUDIO_WANDB_PROJECT", "team")
        ts = tracking_settings(load_settings())
    assert plan({}, ts) == {"mlflow": "http://127.0.0.1:1", "tensorboard": tmp_path / "tb",
                            "wandb": {"project": "team", "entity": None, "mode": "online"}}
    own = plan({"tracking": {"mlflow": "http://mine:5000", "tensorboard": False,
                             "wandb": {"project": "me", "mode": "offline"}}}, ts)
    assert own == {"mlflow": "http://mine:5000", "wandb": {"project": "me", "entity": None, "mode": "offline"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
        bare = tracking_settings(load_settings())
    assert plan({}, bare) == {}
    assert plan({"tracking": {"tensorboard": True}}, bare) == {"tensorboard": tmp_path / "data" / "tensorboard"}


def test_a_missing_tracker_package_is_a_warning_naming_it(settings, monkeypatch):
    from studio import service
    from workers.tracking import open_mirror

    monkeypatch.setitem(sys.modules, "wandb", None)        # as if not installed
    cfg = {**BERT, "tracking": {"wandb": {"project": "p", "mode": "offline"}}}
    rid = service.submit_run(settings, cfg)
    mirror = open_mirror(settings, rid, service.get_run(settings, rid)["config"])
    mirror.log_step({"step": 1, "loss": 1.0})
    assert mirror.close() is True
    (w,) = service.get_run(settings, rid)["warnings"]
    assert w["message"].startswith("wandb:") and "`wandb` package is not installed" in w["message"]
    assert "pip install 'peft-studio[tracking]'" in w["message"]


# ------------------------------------------------------------------ migration 0006

@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_migration_0006_adds_and_removes_the_columns(backend, tmp_path, request):
    from workers import db

    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")

    def columns():
        eng = sa.create_engine(url)
        try:
            return {c["name"] for c in sa.inspect(eng).get_columns("runs")}
        finally:
            eng.dispose()
    db.upgrade(url, "0005")
    assert not {"warnings", "tracking"} & columns()
    db.upgrade(url)                                        # head: 0006 and whatever follows it
    assert {"warnings", "tracking"} <= columns()
    with db.transaction(url) as s:
        rid = db.create_run(s, BERT).id
    with db.transaction(url) as s:
        assert db.add_run_warning(s, rid, "mlflow: unreachable")
        assert db.set_run_tracking(s, rid, "tensorboard", {"logdir": "/x"})
    with db.transaction(url) as s:
        assert db.add_run_warning(s, rid, "wandb: refused")
        assert db.set_run_tracking(s, rid, "mlflow", {"run_id": "r1"})
        assert not db.add_run_warning(s, rid + 1000, "nobody")
    with db.transaction(url) as s:
        run = s.get(db.Run, rid)
        assert [w["message"] for w in run.warnings] == ["mlflow: unreachable", "wandb: refused"]
        assert run.tracking == {"tensorboard": {"logdir": "/x"}, "mlflow": {"run_id": "r1"}}
    for url_, eng in list(db._ENGINES.items()):
        if url_ == url:
            eng.dispose()
    db.downgrade(url, "0005")
    assert not {"warnings", "tracking"} & columns()


# ------------------------------------------------------------------ the Launch form's side (no browser)

TRACKED_YAML = """
name: tracked
model: tiny-bert
task: classification
dataset:
  name: demo-sentiment
method:
  name: lora
  r: 8
  alpha: 16
  target_modules: [query, value]
training:
  max_steps: 30
  batch_size: 8
  learning_rate: 5.0e-4
  max_seq_len: 64
  eval_every: 10
  seed: 0
metric: eval_loss
tracking:
  mlflow: http://mlflow:5000
  tensorboard: true
  wandb:
    project: team
    entity: lab
    mode: offline
"""


def test_the_launch_form_builds_tracking_metric_and_eval_generate_as_the_yaml_would():
    from engine.config import parse_run_config
    from studio import service
    from studio.ui import forms
    from test_ui_optimizer import launch_form

    plain = forms.build_config(launch_form())
    assert "tracking" not in plain and "metric" not in plain and "eval_generate" not in plain["training"]
    cfg = forms.build_config(launch_form(run_name="tracked", metric="eval_loss", tensorboard=True,
                                         mlflow_uri=" http://mlflow:5000 ", wandb_project="team", wandb_entity="lab",
                                         wandb_mode="offline", eval_generate=8))     # eval_generate: causal LM only
    assert cfg["metric"] == "eval_loss" and "eval_generate" not in cfg["training"]
    assert cfg["tracking"] == {"mlflow": "http://mlflow:5000", "tensorboard": True,
                               "wandb": {"project": "team", "entity": "lab", "mode": "offline"}}
    # the same run written by hand as a YAML file: the form's first-load values and the tracking above
    assert parse_run_config(cfg).to_dict() == parse_run_config(yaml.safe_load(TRACKED_YAML)).to_dict()
    lm = forms.build_config(launch_form(model="tiny-llama", task="causal_lm", ds_name="demo-instruct",
                                        target_modules="q_proj", metric="bleu", eval_generate=16))
    # (8, the schema's default, stays implicit; 16 is written)
    assert lm["training"]["eval_generate"] == 16 and parse_run_config(lm).metric_name == "bleu"
    for c in (cfg, lm):                                      # a clone gives the same config back
        assert forms.build_config(forms.form_from_config(c)) == {**c, "name": c["name"] + "-copy"}
    assert forms.metric_choices("causal_lm") == ["eval_loss", "perplexity", "bleu", "rouge_l", "exact_match"]
    # invalid values: the schema's message names the field
    for bad, field in ((dict(metric="bleu"), "metric"), (dict(mlflow_uri="http://u:pw@h:1"), "tracking.mlflow"),
                       (dict(wandb_project="no spaces"), "tracking.wandb.project")):
        with pytest.raises(service.SubmitError, match=rf"{re.escape(field)}"):
            service.validate_config(forms.build_config(launch_form(**bad)), None)
