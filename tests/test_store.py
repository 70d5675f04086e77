"""The artifact store on its own and under a run, in process: atomic writes, sha256
refusal of corrupted objects, clear errors for an unreachable or refusing store
(at start and at run time), no object without a row and no row without an object,
and the upgrade that moves adapter blobs out of the database."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import REPO, free_port

TINY_RUN = {"name": "tiny", "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 64},
            "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["query"]},
            "training": {"max_steps": 2, "batch_size": 4, "max_seq_len": 16, "eval_every": 0}}


def file_store(root: Path, cache: Path):
    from workers.store import ArtifactStore

    return ArtifactStore(root.as_uri(), cache_dir=cache)


def objects(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------ the store alone

def test_file_store_round_trip_cache_and_atomic_refusal(tmp_path):
    from workers.store import ArtifactCorrupt, StoreError

    root = tmp_path / "store"
    st = file_store(root, tmp_path / "cache-a")
    obj = st.put_bytes("runs/1/a.bin", b"x" * 3000)
    assert obj.size == 3000 and obj.sha256 == hashlib.sha256(b"x" * 3000).hexdigest()
    assert st.exists("runs/1/a.bin") and objects(root) == ["runs/1/a.bin"]     # no temporary object left
    local = st.get_file("runs/1/a.bin", obj.sha256)
    assert local.read_bytes() == b"x" * 3000 and local.name == obj.sha256      # cached by sha256
    # a second machine (its own cache) reading bytes changed in the store refuses them
    (root / "runs/1/a.bin").write_bytes(b"y" + b"x" * 2999)
    other = file_store(root, tmp_path / "cache-b")
    with pytest.raises(ArtifactCorrupt, match=f"corrupt: its sha256 is [0-9a-f]{{64}}, the database recorded "
                                              f"{obj.sha256}"):
        other.get_file("runs/1/a.bin", obj.sha256)
    assert list((tmp_path / "cache-b").iterdir()) == []                        # nothing kept of it
    # a refused write (the key's parent is a file) leaves neither the object nor a temporary one
    (root / "blocked").write_bytes(b"")
    with pytest.raises(StoreError, match=r"artifact store file://.*: writing 'blocked/obj' failed"):
        st.put_bytes("blocked/obj", b"data")
    assert objects(root) == ["blocked", "runs/1/a.bin"]
    with pytest.raises(ValueError, match="not a plain relative key"):
        st.put_bytes("../escape", b"")
    st.delete("runs/1/a.bin")
    assert not st.exists("runs/1/a.bin")
    with pytest.raises(StoreError, match="is missing"):
        st.get_file("runs/1/a.bin", obj.sha256 + "0")


def test_store_urls_are_checked_and_secrets_never_shown(tmp_path):
    from workers.store import ArtifactStore, StoreError, redact

    assert redact("s3://AKIA:verysecret@bucket/p") == "s3://***@bucket/p"
    assert "verysecret" not in redact("http://minio:9000/?X-Amz-Signature=verysecret&region=x")
    with pytest.raises(StoreError, match="unsupported scheme 'ftp'"):
        ArtifactStore("ftp://host/x")
    with pytest.raises(StoreError, match="needs a bucket"):
        ArtifactStore("s3:///prefix")
    port = free_port()   # nothing listens there
    st = ArtifactStore("s3://bucket/prefix", endpoint_url=f"http://user:verysecret@127.0.0.1:{port}",
                       cache_dir=tmp_path)
    with pytest.raises(StoreError) as e:
        st.check()
    msg = str(e.value)
    assert f"artifact store s3://bucket/prefix (endpoint http://***@127.0.0.1:{port}) is not usable" in msg
    assert "verysecret" not in msg


def test_worker_and_serve_refuse_to_start_on_an_unreachable_store(tmp_path):
    port = free_port()
    env = {**os.environ, "STUDIO_DATA_DIR": str(tmp_path / "data"), "STUDIO_ARTIFACT_URL": "s3://bucket/x",
           "STUDIO_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "id",
           "AWS_SECRET_ACCESS_KEY": "topsecretvalue"}
    for cmd in (["worker", "--name", "w@test"], ["serve", "--port", str(free_port()), "--no-worker"]):
        out = subprocess.run([sys.executable, "-m", "studio.cli", *cmd], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 2, (cmd, out.stdout[-2000:], out.stderr[-2000:])
        err = out.stderr
        assert f"artifact store s3://bucket/x (endpoint http://127.0.0.1:{port}) is not usable" in err, err[-2000:]
        assert "STUDIO_ARTIFACT_URL" in err and "topsecretvalue" not in out.stdout + err


# ------------------------------------------------------------------ under a run

def other_machine(settings, tmp_path, name):
    """The same database and store seen from another machine: its own data dir and cache."""
    import dataclasses

    return dataclasses.replace(settings, data_dir=tmp_path / name)


def test_finished_run_sweeps_checkpoints_a_killed_worker_left_unrecorded(settings, tmp_path):
    """A worker killed between publishing a checkpoint and recording it leaves an object no
    row names; when the run's checkpoints are forgotten, that object goes too."""
    from workers.checkpoints import delete_checkpoint
    from workers.store import get_store

    store = get_store(settings)
    store.put_bytes("runs/7/checkpoints/step-00000005-deadbeef.safetensors", b"orphan")
    store.put_bytes("runs/8/checkpoints/step-00000002-cafef00d.safetensors", b"another run's")
    assert store.list("runs/7/checkpoints/") == ["runs/7/checkpoints/step-00000005-deadbeef.safetensors"]
    delete_checkpoint(settings, 7)
    assert store.list("runs/7/checkpoints/") == []
    assert store.list("runs/8/checkpoints/") == ["runs/8/checkpoints/step-00000002-cafef00d.safetensors"]
    assert store.list("runs/9/") == []


def test_corrupted_adapter_is_refused_by_sha256_over_rest(settings, tmp_path):
    from fastapi.testclient import TestClient

    from studio import service
    from studio.api import build_api
    from workers.tasks import execute_run

    rid = service.submit_run(settings, TINY_RUN)
    assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
    ad = service.get_run(settings, rid)["adapter"]
    obj = tmp_path / "store" / ad["key"]
    assert obj.stat().st_size == ad["size"] and hashlib.sha256(obj.read_bytes()).hexdigest() == ad["sha256"]
    studio = other_machine(settings, tmp_path, "studio2")
    with TestClient(build_api(studio), raise_server_exceptions=False) as c:
        good = c.get(f"/runs/{rid}/adapter")
        assert good.status_code == 200 and good.content == obj.read_bytes()
        assert "adapter_model.safetensors" in zipfile.ZipFile(io.BytesIO(good.content)).namelist()
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF                   # one byte flipped in the store
    obj.write_bytes(bytes(data))
    with TestClient(build_api(other_machine(settings, tmp_path, "studio3")), raise_server_exceptions=False) as c:
        r = c.get(f"/runs/{rid}/adapter")
        assert r.status_code == 500, r.text
        assert f"artifact {ad['key']!r}" in r.json()["detail"] and "is corrupt" in r.json()["detail"]
        assert ad["sha256"] in r.json()["detail"]


def test_a_store_refusing_writes_fails_the_run_and_leaves_nothing_pointing_nowhere(settings, tmp_path):
    from studio import service
    from workers import db
    from workers.tasks import execute_run

    rid = service.submit_run(settings, TINY_RUN)
    root = tmp_path / "store"
    root.mkdir(exist_ok=True)
    (root / "runs").write_bytes(b"")               # every run object's key is refused
    assert execute_run(rid, settings) == "failed"
    run = service.get_run(settings, rid)
    assert run["status"] == "failed" and run["adapter"] is None
    assert "StoreError: artifact store file://" in run["error"] and "writing 'runs/" in run["error"]
    with db.transaction(settings.database_url) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(db.Adapter)) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(db.Artifact)) == 0
    assert objects(root) == ["runs"]               # no object, no temporary one


def test_an_unreachable_store_at_run_time_fails_the_run_with_its_name(settings, tmp_path):
    import dataclasses

    from studio import service
    from workers.tasks import execute_run

    rid = service.submit_run(settings, {**TINY_RUN, "training": {**TINY_RUN["training"], "checkpoint_every": 1}})
    port = free_port()
    gone = dataclasses.replace(settings, artifact_url="s3://bucket/runs", s3_endpoint_url=f"http://127.0.0.1:{port}")
    assert execute_run(rid, gone) == "failed"
    run = service.get_run(settings, rid)
    assert run["status"] == "failed" and run["adapter"] is None
    assert f"artifact store s3://bucket/runs (endpoint http://127.0.0.1:{port})" in run["error"], run["error"]


# ------------------------------------------------------------------ upgrade from the blob schema

def seed_old_schema(url: str, uploads: Path) -> dict:
    """Schema 0002 with two runs whose adapters are blobs and one uploaded dataset file."""
    from workers import db

    db.upgrade(url, "0002")
    eng = sa.create_engine(url)
    blobs = {}
    meta = sa.MetaData()
    meta.reflect(eng)
    runs, adapters, datasets = meta.tables["runs"], meta.tables["adapters"], meta.tables["datasets"]
    with eng.begin() as conn:
        for i in (1, 2):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                z.writestr("adapter_model.safetensors", os.urandom(5000 * i))
                z.writestr("README.md", f"run {i}")
            blobs[i] = buf.getvalue()
            conn.execute(runs.insert().values(
                id=i, name=f"old{i}", status="succeeded", config=TINY_RUN, model="tiny-bert", method="lora",
                task="classification", priority=0, created_at=db.utcnow(), cancel_requested=False, attempts=1,
                steps_done=2, queue_token=0))
            conn.execute(adapters.insert().values(run_id=i, data=blobs[i], size=len(blobs[i]),
                                                  sha256=hashlib.sha256(blobs[i]).hexdigest(),
                                                  files=["README.md", "adapter_model.safetensors"],
                                                  created_at=db.utcnow()))
        uploads.mkdir(parents=True, exist_ok=True)
        (uploads / "abc.csv").write_bytes(b"text,label\ngood,1\nbad,0\n")
        conn.execute(datasets.insert().values(name="d.csv", stored_name="abc.csv", format="csv", size=24,
                                              sha256=hashlib.sha256(b"text,label\ngood,1\nbad,0\n").hexdigest(),
                                              rows=2, columns=["text", "label"], created_at=db.utcnow()))
    eng.dispose()
    return blobs


def check_upgrade_keeps_every_adapter(settings, tmp_path):
    from studio import service
    from workers import db
    from workers.datasets import resolve_dataset_path

    url = settings.database_url
    settings.ensure_dirs()
    blobs = seed_old_schema(url, settings.uploads_dir)
    db.upgrade(url)
    for rid, blob in blobs.items():
        path, name = service.adapter_file(other_machine(settings, tmp_path, f"reader{rid}"), rid)
        assert path.read_bytes() == blob and name == f"old{rid}-run{rid}-lora.zip"
        assert service.get_run(settings, rid)["adapter"]["sha256"] == hashlib.sha256(blob).hexdigest()
    (settings.uploads_dir / "abc.csv").unlink()          # the worker reads the store, not this file
    ds = resolve_dataset_path(other_machine(settings, tmp_path, "worker"), "upload:abc.csv")
    assert ds.read_bytes() == b"text,label\ngood,1\nbad,0\n" and ds.suffix == ".csv"
    db.downgrade(url, "0002")                          # back to blobs: the same bytes
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        got = dict(conn.execute(sa.text("SELECT run_id, data FROM adapters")).all())
        assert {k: bytes(v) for k, v in got.items()} == blobs
        assert "key" not in {c["name"] for c in sa.inspect(conn).get_columns("adapters")}
    eng.dispose()
    assert (settings.uploads_dir / "abc.csv").read_bytes() == b"text,label\ngood,1\nbad,0\n"
    db.upgrade(url)                                    # and forward again
    assert service.get_adapter(settings, 2)[0] == blobs[2]


def test_upgrade_from_blob_schema_sqlite(monkeypatch, tmp_path):
    from workers.settings import load_settings

    monkeypatch.setenv("STUDIO_ARTIFACT_URL", (tmp_path / "store").as_uri())
    check_upgrade_keeps_every_adapter(load_settings(), tmp_path)


@pytest.mark.postgres
def test_upgrade_from_blob_schema_postgres(monkeypatch, tmp_path, pg_url):
    from workers.settings import load_settings

    monkeypatch.setenv("STUDIO_ARTIFACT_URL", (tmp_path / "store").as_uri())
    monkeypatch.setenv("STUDIO_DATABASE_URL", pg_url)
    check_upgrade_keeps_every_adapter(load_settings(), tmp_path)
