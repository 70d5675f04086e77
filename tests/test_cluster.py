"""Machines that share only PostgreSQL, Redis and the artifact store: the studio and
two workers, each with its OWN data dir, against a shared file:// store (an NFS
mount) and against an S3 API endpoint (moto in server mode on loopback; MinIO is
the production service in compose.yaml).

One flow per store: upload a dataset to the studio; train run S on it straight
through and run K (checkpoint_every, retries) whose worker is SIGKILLed mid-run;
K resumes on the other worker from its last checkpoint in the store; its loss
curve continues S's step for step, and its final adapter equals S's within 1e-6,
both downloaded from the studio."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import REPO, Studio, free_port, fresh_redis, studio_env, wait_status

REDIS_DB = int(os.environ.get("STUDIO_TEST_CLUSTER_REDIS_DB", "13"))
STEPS, EVERY = 100, 5


def dataset_csv(n=80) -> bytes:
    good = ["a wonderful film", "great acting", "lovely and moving", "a joy to watch"]
    bad = ["dull and slow", "awful plot", "boring from start to end", "a waste of time"]
    rows = [f"{(good if i % 2 else bad)[i % 4]} {i},{i % 2}" for i in range(n)]
    return ("text,label\n" + "\n".join(rows) + "\n").encode()


def run_config(name: str, path: str, **training) -> dict:
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"path": path, "text_column": "text", "label_column": "label"},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "training": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 5e-3, "max_seq_len": 32,
                         "eval_every": 0, "checkpoint_every": EVERY, **training}}


@pytest.fixture
def redis_db():
    yield from fresh_redis(REDIS_DB)


@pytest.fixture
def moto_s3():
    """An S3 API endpoint on a free loopback port with an empty bucket."""
    import boto3   # moto and boto3 are test extras: missing, the test fails rather than skips
    from moto.server import ThreadedMotoServer

    creds = {"AWS_ACCESS_KEY_ID": "cluster-test", "AWS_SECRET_ACCESS_KEY": "cluster-secret",
             "AWS_DEFAULT_REGION": "us-east-1"}
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="peft-cluster")
    yield {"STUDIO_ARTIFACT_URL": "s3://peft-cluster/artifacts", "STUDIO_S3_ENDPOINT_URL": endpoint, **creds}
    server.stop()


def start_worker(studio: Studio, name: str, env: dict) -> subprocess.Popen:
    log = open(studio.tmp / f"worker-{name}.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "studio.cli", "worker", "--name", name], env=env, cwd=REPO,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    studio.workers.append(p)
    return p


def adapter_tensors(client, rid):
    from safetensors.torch import load

    r = client.get(f"/api/runs/{rid}/adapter")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text[:500]
    return load(zipfile.ZipFile(io.BytesIO(r.content)).read("adapter_model.safetensors"))


def cluster_flow(tmp_path, shared: dict, store_env: dict):
    env = studio_env(tmp_path, **shared, **store_env)
    studio = Studio(env, tmp_path, embedded_worker=False)
    workers = {}
    try:
        for name in ("w1@machine-1", "w2@machine-2"):
            wenv = {**env, "STUDIO_DATA_DIR": str(tmp_path / name.split("@")[1])}   # its own disk
            workers[name] = start_worker(studio, name, wenv)
        with studio.client() as c:
            up = c.post("/api/datasets", files={"file": ("reviews.csv", dataset_csv(), "text/csv")})
            assert up.status_code == 201, up.text
            path = up.json()["path"]
            kid = c.post("/api/runs", json=run_config("killed", path, retries=1)).json()["id"]
            sid = c.post("/api/runs", json=run_config("straight", path)).json()["id"]
            deadline = time.monotonic() + 240
            while (run := c.get(f"/api/runs/{kid}").json())["steps_done"] < 2 * EVERY:
                assert time.monotonic() < deadline and run["status"] in ("queued", "running"), (run, studio.logs())
                time.sleep(0.1)
            victim = next(n for n, p in workers.items() if p.pid == run["worker_pid"])
            os.killpg(workers[victim].pid, signal.SIGKILL)   # the machine is gone, mid-run
            assert run["steps_done"] < STEPS
            straight = wait_status(c, sid, timeout=300)
            assert straight["status"] == "succeeded", studio.logs()
            run = wait_status(c, kid, timeout=300)
            assert run["status"] == "succeeded", (run, studio.logs())
            assert run["attempts"] == 2 and run["worker_host"] != victim and run["steps_done"] == STEPS
            assert run["resumed_from_step"] and run["resumed_from_step"] % EVERY == 0, run
            # the loss curve continues: every step once, each loss the straight-through run's
            mk = c.get(f"/api/runs/{kid}/metrics").json()
            ms = c.get(f"/api/runs/{sid}/metrics").json()
            assert [m["step"] for m in mk] == list(range(1, STEPS + 1))
            for a, b in zip(mk, ms):
                assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
            tk, ts = adapter_tensors(c, kid), adapter_tensors(c, sid)
            assert set(tk) == set(ts) and tk
            for k in tk:
                assert (tk[k] - ts[k]).abs().max().item() <= 1e-6, k
        # nothing travelled through a shared disk: the upload is in no machine's uploads dir
        for d in ("data", "machine-1", "machine-2"):
            assert not list((tmp_path / d / "uploads").glob("*.csv")), d
        return run
    finally:
        studio.stop()


@pytest.mark.redis
@pytest.mark.postgres
def test_cluster_with_a_shared_file_store(tmp_path, pg_url, redis_db):
    store = tmp_path / "nfs-mount" / "artifacts"
    cluster_flow(tmp_path, {"STUDIO_DATABASE_URL": pg_url, "STUDIO_BROKER_URL": redis_db},
                 {"STUDIO_ARTIFACT_URL": store.as_uri()})
    assert any(store.glob("datasets/*.csv")) and any(store.glob("runs/*/adapter-*.zip"))
    assert not any(store.glob("runs/*/checkpoints/*"))     # a finished run's checkpoints are removed
    assert not any((store / ".tmp").glob("*"))


@pytest.mark.redis
@pytest.mark.postgres
def test_cluster_with_an_s3_store(tmp_path, pg_url, redis_db, moto_s3):
    import boto3

    cluster_flow(tmp_path, {"STUDIO_DATABASE_URL": pg_url, "STUDIO_BROKER_URL": redis_db}, moto_s3)
    s3 = boto3.client("s3", endpoint_url=moto_s3["STUDIO_S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=moto_s3["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=moto_s3["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="peft-cluster").get("Contents", [])]
    assert any(k.startswith("artifacts/datasets/") for k in keys), keys
    assert sum(k.startswith("artifacts/runs/") and "/adapter-" in k for k in keys) == 2, keys
    assert not any("/checkpoints/" in k for k in keys), keys


def test_s3_store_lists_a_prefix_and_deletes(moto_s3, tmp_path):
    """The S3 side of the store's listing (used to sweep unrecorded checkpoints)."""
    import os

    from workers.store import ArtifactStore

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: moto_s3[k] for k in keys})
    try:
        store = ArtifactStore(moto_s3["STUDIO_ARTIFACT_URL"], endpoint_url=moto_s3["STUDIO_S3_ENDPOINT_URL"],
                              cache_dir=tmp_path / "cache")
        store.put_bytes("runs/3/checkpoints/step-00000004-aaaa.safetensors", b"x")
        store.put_bytes("runs/3/adapter-bbbb.zip", b"y")
        assert store.list("runs/3/checkpoints/") == ["runs/3/checkpoints/step-00000004-aaaa.safetensors"]
        assert store.list("runs/4/") == []
        store.delete("runs/3/checkpoints/step-00000004-aaaa.safetensors")
        assert store.list("runs/3/") == ["runs/3/adapter-bbbb.zip"]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
