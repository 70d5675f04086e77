"""Studies on a served studio (`peft-studio serve`: its study driver thread and embedded
worker): REST /api/studies as in shared/DESIGN.md, `peft-studio study CONFIG`, and a
studio killed in the middle of a study (SIGKILL, worker and driver with it) whose
successor finishes the study with no trial lost and none run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import REPO, Studio, stop_groups, studio_env


def tiny_study(**kw) -> dict:
    body = {"name": "served", "methods": ["lora", "bitfit"], "budget": {"trials": 4}, "metric": "accuracy",
            "parallel": 2,
            "base": {"model": "tiny-bert", "task": "classification",
                     "dataset": {"name": "demo-sentiment", "max_rows": 96},
                     "training": {"max_steps": 6, "batch_size": 8, "max_seq_len": 24, "eval_every": 3,
                                  "eval_batches": 1}}}
    body.update(kw)
    return body


def wait_study(client, sid: int, statuses=("completed", "failed", "cancelled"), timeout: float = 400.0,
               until=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get(f"/api/studies/{sid}").json()
        if st["status"] in statuses or (until is not None and until(st)):
            return st
        time.sleep(1.0)
    raise TimeoutError(f"study {sid} still {st['status']} after {timeout} s: {st['trials']}")


def test_rest_contract_and_the_cli(tmp_path):
    env = studio_env(tmp_path)
    s = Studio(env, tmp_path)
    try:
        c = s.client()
        r = c.post("/api/studies", json=tiny_study(budget={"trials": 1}))
        assert r.status_code == 422 and r.json()["detail"].startswith("budget.trials:")
        r = c.post("/api/studies", json=tiny_study())
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        st = wait_study(c, sid)
        assert st["status"] == "completed", s.logs()
        assert len(st["trials"]) == 4
        for t in st["trials"]:
            assert {"run_id", "method", "params", "value", "state"} <= set(t)
            assert "learning_rate" in t["params"]
            run = c.get(f"/api/runs/{t['run_id']}").json()       # an ordinary run
            assert run["config"]["method"]["name"] == t["method"]
        assert set(st["best"]) == {"lora", "bitfit"}
        assert {"run_id", "value", "params"} <= set(st["best"]["lora"])
        assert c.get(f"/api/runs/{st['best']['lora']['run_id']}/adapter").status_code == 200
        assert [x["id"] for x in c.get("/api/studies").json()] == [sid]
        assert c.post(f"/api/studies/{sid}/cancel").json()["status"] == "completed"   # finished: left as is
        assert c.get("/api/studies/999").status_code == 404

        # the CLI: submits, follows (advancing the study beside the studio's driver), exits 0
        cfg = tmp_path / "study.yaml"
        cfg.write_text(yaml.safe_dump(tiny_study(name="from-cli", methods=["ia3"], budget={"trials": 2})))
        out = subprocess.run([sys.executable, "-m", "studio.cli", "study", str(cfg)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.strip().splitlines()
        first, last = json.loads(lines[0]), json.loads(lines[-1])
        assert last["id"] == first["id"] and last["status"] == "completed" and "ia3" in last["best"]
        assert any(" ia3 trial 1 " in ln for ln in lines)
        nw = subprocess.run([sys.executable, "-m", "studio.cli", "study", str(cfg), "--no-wait"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=200)
        assert nw.returncode == 0 and list(json.loads(nw.stdout.strip().splitlines()[-1])) == ["id"]
    finally:
        s.stop()


def test_a_studio_killed_mid_study_loses_no_trial(tmp_path):
    env = studio_env(tmp_path)
    s = Studio(env, tmp_path)
    try:
        c = s.client()
        sid = c.post("/api/studies", json=tiny_study(budget={"trials": 4}, parallel=2)).json()["id"]
        mid = wait_study(c, sid, until=lambda st: sum(t["state"] == "completed" for t in st["trials"]) >= 1
                         and len(st["trials"]) >= 3)
        assert mid["status"] == "running"
    finally:
        try:   # a crash, not a shutdown: the studio, its driver thread and its worker die at once
            os.killpg(s.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        s.proc.wait()
        s.log.close()
    s2 = Studio(env, tmp_path)
    try:
        c = s2.client()
        st = wait_study(c, sid)
        assert st["status"] == "completed", s2.logs()
        assert len(st["trials"]) == 4
        ids = [t["run_id"] for t in st["trials"]]
        assert all(ids) and len(set(ids)) == 4
        runs = [r for r in c.get("/api/runs").json() if r["name"].startswith(f"study{sid}-")]
        assert sorted(r["id"] for r in runs) == sorted(ids), "a trial's run was launched twice"
        assert all(t["state"] in ("completed", "pruned") for t in st["trials"]), st["trials"]
        # the trials known before the crash are the same trials after it
        before = {(t["method"], t["number"]): t["run_id"] for t in mid["trials"] if t["run_id"]}
        after = {(t["method"], t["number"]): t["run_id"] for t in st["trials"]}
        assert all(after[k] == v for k, v in before.items())
    finally:
        stop_groups([s2.proc])
        s2.log.close()
