"""compose.yaml describes the scale-out deployment (docker itself is not available here)."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_names_the_services_and_wires_them():
    doc = yaml.safe_load((REPO / "compose.yaml").read_text())
    svc = doc["services"]
    assert {"redis", "postgres", "minio", "create-bucket", "migrate", "studio", "worker"} <= set(svc)
    assert svc["migrate"]["command"] == ["peft-studio", "db", "upgrade"]
    assert svc["migrate"]["restart"] == "no"
    assert svc["studio"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = svc["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("studio", "worker", "migrate"):
        env = svc[name]["environment"]
        assert env["STUDIO_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["STUDIO_BROKER_URL"].startswith("redis://")
    assert "STUDIO_USERS" in svc["studio"]["environment"]   # non-loopback needs login


def test_compose_artifact_store_is_minio_and_nothing_else_is_shared():
    doc = yaml.safe_load((REPO / "compose.yaml").read_text())
    svc = doc["services"]
    assert svc["minio"]["image"].startswith("minio/minio")
    bucket_cmd = " ".join(svc["create-bucket"]["command"])
    assert "mc mb" in bucket_cmd and "store/peft-studio" in bucket_cmd
    assert svc["create-bucket"]["restart"] == "no"
    assert svc["migrate"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    for name in ("studio", "worker", "migrate"):
        env = svc[name]["environment"]
        assert env["STUDIO_ARTIFACT_URL"] == "s3://peft-studio/artifacts"   # the bucket create-bucket makes
        assert env["STUDIO_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    # the studio and the worker share no volume: everything travels through the store
    vols = {name: {v.split(":")[0] for v in svc[name].get("volumes", [])} for name in ("studio", "worker")}
    assert not (vols["studio"] & vols["worker"]), vols
