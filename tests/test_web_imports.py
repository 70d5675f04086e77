"""The web process does not build a Celery app to validate a run: importing the
studio's server and API, and checking a run config with a dataset path, leaves
`workers.tasks` and `celery` unimported (checked in a fresh interpreter)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
import studio.server, studio.api, studio.service
from studio.runtime import prepare_database
from workers.settings import load_settings

settings = load_settings()
prepare_database(settings)
errors = []
for path in ("upload:nothing-here.csv", "/etc/passwd"):
    cfg = {"name": "x", "model": "tiny-bert", "task": "classification",
           "dataset": {"path": path, "text_column": "t", "label_column": "l"},
           "method": {"name": "lora", "r": 4, "target_modules": ["query"]}, "training": {"max_steps": 1}}
    try:
        studio.service.validate_config(cfg, settings)
    except studio.service.SubmitError as e:
        errors.append(str(e))
print(json.dumps({"loaded": sorted(m for m in ("workers.tasks", "celery", "workers.celery_app") if m in sys.modules),
                  "errors": errors}))
"""


def test_studio_imports_and_dataset_checks_do_not_import_celery(tmp_path):
    env = {"STUDIO_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["loaded"] == [], res
    # both checks ran (and refused), so the probe exercised the dataset path rules
    assert "no uploaded dataset" in res["errors"][0] and "outside the allowed data directories" in res["errors"][1]
