"""compose.yaml describes the scale-out deployment (docker itself is not available here)."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_names_the_services_and_wires_them():
    doc = yaml.safe_load((REPO / "compose.yaml").read_text())
    svc = doc["services"]
    assert {"redis", "postgres", "migrate", "studio", "worker"} <= set(svc)
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
