"""bench/gpu_check.py --dry-run: the CUDA check's code runs on CPU (tiny random Llama),
so the script that will run the day a GPU is available cannot rot. It writes a stamped
file with a row for every registered method and the NF4 comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_stamped_rows_for_every_method(tmp_path):
    out = tmp_path / "gpu.md"
    official = REPO / "bench" / "RESULTS-gpu.md"
    before = official.read_bytes() if official.exists() else None
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.exists(), proc.stderr[-4000:]
    text = out.read_text()
    failed = next(line for line in text.splitlines() if line.startswith("Failed: "))
    assert failed == "Failed: nothing.", failed      # e.g. a method that breaks under bf16 autocast
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = text.splitlines()
    # the stamp (bench/stamp.py) comes first
    assert lines[0].startswith("commit ") and len(lines[0].split()[1].split("+")[0]) == 40
    assert any(line.startswith("- date: ") for line in lines[:6])
    assert any(line.startswith("- versions: ") and "torch" in line for line in lines[:6])
    assert "# GPU check (dry run)" in text
    # a row per registered method in the estimator section, measured or refused with a reason
    section = text.split("## 2.")[1].split("## 3.")[0]
    for name in METHODS:
        row = next((r for r in section.splitlines() if r.startswith(f"| {name} |")), None)
        assert row is not None, f"no row for method {name!r}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "refused" in cells[1] or (cells[-1] and cells[-1] not in ("nan", "inf")), row
    # the engine-vs-peft rows, the NF4 comparison and the bf16 autocast path
    assert "| LoRA r=8 q,v |" in text and "| QLoRA r=8 q,v (NF4) |" in text
    assert "equals the CPU path" in text
    assert "torch.float32 / torch.bfloat16" in text
    assert "(finite)" in text
    # section 5: the real run against HF Trainer + peft, each side measured (no FAILED row)
    peers = text.split("## 5.")[1]
    for side in ("engine eager", "HF Trainer + peft", "engine QLoRA"):
        row = next(r for r in peers.splitlines() if r.startswith(f"| tiny-llama | {side} |"))
        assert float(row.split("|")[3]) > 0, row
    assert "QLoRA / LoRA step" in peers
    # the dry run never touches the committed GPU results
    assert (official.read_bytes() if official.exists() else None) == before


def test_gpu_check_dry_run_refuses_the_official_results_path(tmp_path):
    official = REPO / "bench" / "RESULTS-gpu.md"
    before = official.read_bytes() if official.exists() else None
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--sections", "nf4",
                           "--out", str(REPO / "bench" / "RESULTS-gpu.md")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "never writes bench/RESULTS-gpu.md" in proc.stderr
    assert (official.read_bytes() if official.exists() else None) == before    # the measured file is untouched
