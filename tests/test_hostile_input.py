"""Hostile or broken input: dataset uploads (lying types, archives and bombs, pickles,
non-UTF-8 text, path-traversal names, symlinks, size), model and dataset paths outside
the allowed roots, pickled weights, and no trust_remote_code / torch.load anywhere.

Uploads go through the real /api app in process (FastAPI TestClient) with a fresh
data dir; the system temp dir and the datasets cache are redirected to watched
folders so a file written anywhere but the data dir would show up."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSV = b"text,label\nthis film was great,1\nawful and boring,0\nlovely acting,1\nterrible plot,0\n"


def parquet_bytes(**cols) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    b = io.BytesIO()
    pq.write_table(pa.table(cols or {"text": ["good", "bad"], "label": [1, 0]}), b)
    return b.getvalue()


def zip_bytes(name: str, data: bytes) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return b.getvalue()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An in-process /api on a fresh data dir (upload limit 1 MiB), with the system
    temp dir and the Hugging Face datasets cache pointed at folders we watch."""
    import datasets
    from fastapi.testclient import TestClient

    from studio.api import build_api
    from workers import db
    from workers.settings import load_settings

    systmp, hfcache = tmp_path / "systmp", tmp_path / "hfcache"
    systmp.mkdir()
    monkeypatch.setenv("STUDIO_MAX_UPLOAD_MB", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hfcache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hfcache))
    settings = load_settings()
    settings.ensure_dirs()
    db.upgrade(settings.database_url)
    client = TestClient(build_api(settings), raise_server_exceptions=False)

    class Env:
        pass

    e = Env()
    e.settings, e.client, e.systmp, e.hfcache, e.tmp = settings, client, systmp, hfcache, tmp_path
    e.accepted = []   # stored names of accepted uploads

    def upload(name, data, *, ok=False):
        r = e.client.post("/datasets", files={"file": (name, data, "application/octet-stream")})
        if ok:
            assert r.status_code == 201, r.text
            e.accepted.append(r.json()["path"].removeprefix("upload:"))
        return r

    def rebuild():   # after changing STUDIO_*_ROOTS: the app reads its settings when built
        e.settings = load_settings()
        e.client = TestClient(build_api(e.settings), raise_server_exceptions=False)

    e.upload, e.rebuild = upload, rebuild
    yield e
    # nothing half-written, nothing elsewhere: the artifact store holds exactly the accepted
    # files (and no temporary object), the studio's uploads staging dir, the temp dir and
    # the datasets cache nothing
    store = settings.data_dir / "artifacts"
    assert sorted(p.name for p in (store / "datasets").glob("*")) == sorted(e.accepted)
    assert not any((store / ".tmp").glob("*"))
    assert list(settings.uploads_dir.iterdir()) == []
    # (torch keeps its own compile cache there, torchinductor_<user>; no user data)
    assert [p for p in systmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert not hfcache.exists() or not any(hfcache.rglob("*")), list(hfcache.rglob("*"))[:5]


def assert_refused(r, *words, status=422):
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and re.match(r"^(upload|dataset\.path|file): ", detail), detail
    for w in words:
        assert w.lower() in detail.lower(), detail


# ------------------------------------------------------------------ accepted files

def test_good_uploads_are_stored_under_new_names_in_the_artifact_store(env):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    for name, data in [("reviews.csv", CSV), ("rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()),
                       ("rows.json", json.dumps(rows).encode()), ("t.parquet", parquet_bytes()),
                       ("日本語 データ.csv", CSV)]:
        info = env.upload(name, data, ok=True).json()
        assert info["columns"] == ["text", "label"] and info["rows"] >= 2
        stored = env.settings.data_dir / "artifacts" / "datasets" / info["path"].removeprefix("upload:")
        assert stored.is_file() and re.fullmatch(r"[0-9a-f]{32}\.(csv|jsonl|parquet)", stored.name)
    names = [u["name"] for u in env.client.get("/datasets").json()]
    assert "file.csv" in names   # a non-Latin name keeps its type, loses the odd characters


# ------------------------------------------------------------------ refused files

HOSTILE = {
    "csv that is a zip": ("data.csv", zip_bytes("data.csv", CSV), ["compressed or an archive"]),
    "jsonl that is gzip": ("data.jsonl", gzip.compress(b'{"text": "a", "label": 1}\n'), ["compressed"]),
    "csv that is bzip2": ("data.csv", bz2.compress(CSV), ["compressed"]),
    "csv that is xz": ("data.csv", lzma.compress(CSV), ["compressed"]),
    "parquet that is text": ("data.parquet", CSV, ["not a Parquet file"]),
    "csv that is parquet": ("data.csv", parquet_bytes(), ["binary"]),
    "pickle named csv": ("data.csv", pickle.dumps({"text": ["a"]}, protocol=4), ["pickle"]),
    "pickle named parquet": ("data.parquet", pickle.dumps([1, 2, 3], protocol=5), ["pickle"]),
    "pickle protocol 2 named jsonl": ("x.jsonl", pickle.dumps({"a": 1}, protocol=2), ["pickle"]),
    "latin-1 csv": ("data.csv", "text,label\ncaf\u00e9 cr\u00e8me,1\nna\u00efve,0\n".encode("latin-1"),
                    ["not UTF-8"]),
    "utf-16 csv": ("data.csv", CSV.decode().encode("utf-16"), []),
    "declared zip": ("data.zip", zip_bytes("data.csv", CSV), ["unsupported file type"]),
    "declared gzip": ("data.csv.gz", gzip.compress(CSV), ["unsupported file type"]),
    "declared pickle": ("data.pkl", pickle.dumps(CSV), ["unsupported file type"]),
    "no extension": ("data", CSV, ["unsupported file type"]),
    "executable": ("data.exe", b"MZ\x90\x00", ["unsupported file type"]),
    "empty": ("data.csv", b"", ["empty"]),
    "zip bomb named csv": ("data.csv", zip_bytes("big.csv", b"0" * (50 << 20)), ["compressed"]),
    "gzip bomb named jsonl": ("data.jsonl", gzip.compress(b" " * (50 << 20), 9), ["compressed"]),
    "malformed jsonl": ("data.jsonl", b'{"text": "a", "label": \n{{{\n', ["could not read"]),
    "jsonl of scalars": ("data.jsonl", b"1\n2\n3\n", ["could not read"]),
    "traversal name": ("../../etc/passwd.csv", CSV, ["plain file name"]),
    "absolute name": ("/tmp/evil.csv", CSV, ["plain file name"]),
    "backslash name": ("..\\..\\evil.csv", CSV, ["plain file name"]),
    "NUL in name": ("evil.csv\x00.txt", CSV, []),   # the client may drop the NUL: then ".txt" is refused
    "dot-dot name": ("..", CSV, ["plain file name"]),
    # a column no run config could name (engine.config refuses control characters in text fields)
    "control character in a column name": ("cols.csv", b"te\x1bxt,label\na,1\nb,0\n", ["column name", "control"]),
    "C1 character in a jsonl key": ("cols.jsonl", '{"te\u0085xt": "a", "label": 1}\n'.encode(), ["column name"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_uploads_are_refused_with_a_clear_error(env, case):
    name, data, words = HOSTILE[case]
    r = env.upload(name, data)
    if r.status_code == 400 and case == "NUL in name":   # the multipart parser may refuse it itself
        return
    assert_refused(r, *words)
    assert env.client.get("/datasets").json() == []


def test_parquet_compression_bomb_is_refused(env):
    # 20 MB of text in a few KB of dictionary-encoded Parquet: over 10x the 1 MiB limit
    data = parquet_bytes(text=["x" * 1000] * 12000, label=[1] * 12000)
    assert len(data) < 64 << 10
    assert_refused(env.upload("bomb.parquet", data), "uncompressed")


def test_over_the_size_limit_is_refused_with_413(env):
    r = env.upload("big.csv", b"text,label\n" + b"a,1\n" * (300 << 10))   # 1.2 MiB > 1 MiB
    assert_refused(r, "over the limit", status=413)


def test_save_upload_refuses_symlinks_and_special_files(env, tmp_path):
    from studio import service

    real = tmp_path / "real.csv"
    real.write_bytes(CSV)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    for src in (link, tmp_path, Path("/dev/zero")):
        with pytest.raises(service.SubmitError, match=r"^upload: symbolic links and special files"):
            service.save_upload(env.settings, "x.csv", src)
    for name in ("evil.csv\x00.txt", "a\x00.csv", "../x.csv", "/abs/x.csv", "..\\x.csv", "x\n.csv"):
        with pytest.raises(service.SubmitError, match=r"^upload: file name .* must be a plain file name"):
            service.save_upload(env.settings, name, real)
    # a plain file works through the same function
    info = service.save_upload(env.settings, "real.csv", real)
    env.accepted.append(info["path"].removeprefix("upload:"))


def test_refused_upload_leaves_no_temp_files_even_when_parsing_fails_late(env):
    # valid UTF-8, right magic, but not CSV the parser can use: refused after being copied
    r = env.upload("ragged.csv", b'a,b\n"unterminated,1\n' + b"x,y,z,w\n" * 10)
    if r.status_code == 201:   # the CSV parser may accept it; then it is a legitimate upload
        env.accepted.append(r.json()["path"].removeprefix("upload:"))
    else:
        assert_refused(r)


# ------------------------------------------------------------------ data files the engine reads directly

def test_read_table_refuses_lying_and_binary_files(tmp_path):
    from engine.data import DataError, read_table

    cases = {"z.csv": zip_bytes("a.csv", CSV), "g.jsonl": gzip.compress(b"{}\n"), "p.csv": parquet_bytes(),
             "t.parquet": CSV, "k.csv": pickle.dumps([1]), "l.csv": "caf\u00e9\n".encode("latin-1"),
             "n.jsonl": b'{"a": "\x00"}\n'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=r"^dataset\.path: "):
            read_table(tmp_path / name)


# ------------------------------------------------------------------ model and dataset paths at submit time

def run_config(**over):
    cfg = {"name": "hostile", "model": "tiny-bert", "task": "classification",
           "dataset": {"name": "demo-sentiment", "max_rows": 50},
           "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
           "training": {"max_steps": 3}}
    cfg.update(over)
    return cfg


def make_model_dir(d: Path, weights: str) -> Path:
    from engine.models import tiny_config

    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(tiny_config("bert", 30522).to_dict()))
    (d / weights).write_bytes(b"\x80\x04K\x01." if weights.endswith(".bin") else b"{}")
    return d


def test_model_paths_outside_the_allowed_roots_are_refused_at_submit(env, tmp_path, monkeypatch):
    roots = tmp_path / "models"
    monkeypatch.setenv("STUDIO_MODEL_ROOTS", str(roots))
    env.rebuild()
    outside = make_model_dir(tmp_path / "elsewhere" / "m", "model.safetensors")
    inside = make_model_dir(roots / "m", "model.safetensors")
    for model in (str(outside), "/etc", "/etc/passwd", str(roots / ".." / "elsewhere" / "m"), "~/../../etc"):
        r = env.client.post("/runs", json=run_config(model=model))
        assert r.status_code == 422 and r.json()["detail"].startswith("model: "), (model, r.text)
        assert "outside the allowed model roots" in r.json()["detail"], r.text
    # a symlink inside the roots that points outside is judged by its target
    (roots / "link").symlink_to(outside)
    r = env.client.post("/runs", json=run_config(model=str(roots / "link")))
    assert r.status_code == 422 and "outside the allowed model roots" in r.json()["detail"], r.text
    # the estimator does not read config files outside the roots either
    r = env.client.get("/estimate", params={"model": "/etc/passwd", "method": "lora"})
    assert r.status_code == 422 and r.json()["detail"].startswith("model: ") and "roots" in r.json()["detail"]
    r = env.client.get("/estimate", params={"model": str(outside / "config.json"), "method": "lora"})
    assert r.status_code == 422 and "roots" in r.json()["detail"], r.text
    r = env.client.get("/estimate", params={"model": str(inside / "config.json"), "method": "lora", "r": 4,
                                            "target_modules": "query,value"})
    assert r.status_code == 200, r.text
    # inside the roots the structure check runs (and passes) on the meta device
    r = env.client.post("/runs", json=run_config(model=str(inside)))
    assert r.status_code == 201, r.text


def test_pickled_weights_are_refused(env, tmp_path, monkeypatch):
    from engine.models import ModelLoadError, check_local_model_dir

    monkeypatch.setenv("STUDIO_MODEL_ROOTS", str(tmp_path))
    env.rebuild()
    d = make_model_dir(tmp_path / "pickled", "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights.*pytorch_model\.bin.*never loaded"):
        check_local_model_dir(d, [tmp_path])
    r = env.client.post("/runs", json=run_config(model=str(d)))
    assert r.status_code == 422 and r.json()["detail"].startswith("model: ") and "pickle" in r.json()["detail"]


def test_dataset_paths_outside_the_data_roots_are_refused_at_submit(env, tmp_path, monkeypatch):
    droot = tmp_path / "datasets"
    droot.mkdir()
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(droot))
    env.rebuild()
    (droot / "ok.csv").write_bytes(CSV)
    (tmp_path / "outside.csv").write_bytes(CSV)
    (droot / "escape.csv").symlink_to(tmp_path / "outside.csv")
    bad = {"path": [str(tmp_path / "outside.csv"), "/etc/passwd", str(droot / ".." / "outside.csv"),
                    str(droot / "escape.csv"), "upload:../x.csv", "upload:.hidden", "upload:nope.csv",
                    "a\x00.csv"],
           "validation_path": [str(tmp_path / "outside.csv")]}
    for field, values in bad.items():
        for v in values:
            ds = {"path": str(droot / "ok.csv"), field: v} if field != "path" else {"path": v}
            r = env.client.post("/runs", json=run_config(dataset=ds))
            assert r.status_code == 422, (v, r.text)
            assert r.json()["detail"].startswith(f"dataset.{field}: "), (v, r.text)
    assert env.client.get("/runs").json() == []
    r = env.client.post("/runs", json=run_config(dataset={"path": str(droot / "ok.csv")}))
    assert r.status_code == 201, r.text
    up = env.upload("mine.csv", CSV, ok=True).json()
    r = env.client.post("/runs", json=run_config(dataset={"path": up["path"]}))
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------ no remote code, no pickles, anywhere

def product_sources():
    for pkg in ("engine", "studio", "workers"):
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_no_trust_remote_code_and_no_torch_load_in_product_code():
    offenders = []
    for f in product_sources():
        text = f.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"trust_remote_code\s*=\s*(True|1|[a-z_]\w*(?<!False))\b", code):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
            if re.search(r"\btorch\.load\s*\(|\bpickle\.loads?\s*\(|\bjoblib\.load\s*\(|\bnp\.load\s*\(.*allow_pickle\s*=\s*True",
                         code):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
            if re.search(r"use_safetensors\s*=\s*False|weights_only\s*=\s*False", code):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_an_upload_announced_over_the_limit_is_refused_before_its_body_is_read(env):
    import asyncio

    from studio.api import build_api

    app = build_api(env.settings)
    sent, reads = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/datasets", "raw_path": b"/datasets", "query_string": b"",
             "root_path": "", "server": ("t", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"t"), (b"content-type", b"multipart/form-data; boundary=x"),
                         (b"content-length", str(50 << 30).encode())]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and reads == []
    assert b"over the limit" in sent[1]["body"]
