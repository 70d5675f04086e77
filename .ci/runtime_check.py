"""Prove that `make install` alone (no test extras) trains every bundled model and serves
runs: run with the python of a virtual environment made by `make install VENV=...`.

1. `peft-studio train` two steps of MiniLM classification (demo-sentiment) and of SmolLM2
   causal LM (demo-instruct) with the generation metrics on. A fresh data directory, so
   SmolLM2's one-time GGUF conversion runs too (it needs `gguf` and `accelerate`).
2. `peft-studio serve` on a free loopback port (its embedded worker), one run POSTed to
   /api/runs and polled until it is `succeeded`.

Any failure exits non-zero with what failed and the tail of its output. Standard library
only: this must not depend on anything the runtime environment lacks.

    .venv-runtime/bin/python .ci/runtime_check.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
STUDIO = BIN / "peft-studio"
# small, so that CI stays fast: a short sequence, few evaluation rows and generated tokens
TRAINING = {"max_steps": 2, "batch_size": 2, "max_seq_len": 32, "eval_every": 0, "eval_max_rows": 8}
CONFIGS = {
    "minilm-classification": {"model": "minilm", "task": "classification", "dataset": {"name": "demo-sentiment"},
                              "method": {"name": "lora", "r": 4}, "training": TRAINING},
    "smollm2-causal-lm": {"model": "smollm2-135m", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
                          "method": {"name": "lora", "r": 4},
                          # 64 tokens: the chat-formatted prompt leaves room for the response to be scored
                          "training": {**TRAINING, "max_seq_len": 64, "eval_generate": 2, "eval_generate_tokens": 8},
                          "metric": "rouge_l"},
}
SERVE_TIMEOUT_S = 180
RUN_TIMEOUT_S = 1200     # a quiet 2-core machine needs about a minute per step below; a loaded one far more


def fail(what: str, output: str = "") -> "NoReturn":  # noqa: F821
    tail = "\n".join(output.strip().splitlines()[-40:])
    print(f"runtime check FAILED: {what}" + (f"\n--- last lines ---\n{tail}" if tail else ""), file=sys.stderr)
    sys.exit(1)


def check_no_test_extras() -> None:
    """The environment must be the runtime one: a test-only package here would hide what is missing."""
    import importlib.util

    found = [m for m in ("peft", "pytest", "playwright") if importlib.util.find_spec(m)]
    if found:
        fail(f"{sys.prefix} holds test-only packages ({', '.join(found)}); make it with `make install` alone")


def train_each(env: dict, work: Path) -> None:
    for name, body in CONFIGS.items():
        cfg = work / f"{name}.json"
        cfg.write_text(json.dumps({"name": name, **body}))
        out = work / "out" / name
        t0 = time.monotonic()
        try:
            p = subprocess.run([str(STUDIO), "train", str(cfg), "--out", str(out)], env=env, capture_output=True,
                               text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            fail(f"peft-studio train {name} did not finish within {RUN_TIMEOUT_S} s",
                 (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        if p.returncode != 0:
            fail(f"peft-studio train {name} exited {p.returncode}", p.stdout + p.stderr)
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl")
                   if not (out / f).is_file()]
        if missing:
            fail(f"peft-studio train {name} wrote no {', '.join(missing)} in {out}", p.stderr)
        results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
        ev = results.get("eval") or {}
        if name.startswith("smollm2") and ("rouge_l" not in ev or not ev.get("eval_loss")):
            fail(f"{name}: no generation metrics or no scored tokens in its results ({ev})", p.stderr)
        print(f"ok: peft-studio train {name} ({time.monotonic() - t0:.0f} s; eval "
              f"{ {k: round(v, 4) for k, v in ev.items() if isinstance(v, (int, float))} })", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def serve_one_run(env: dict, work: Path) -> None:
    port = free_port()
    log = open(work / "serve.log", "w+")
    proc = subprocess.Popen([str(STUDIO), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api"

    def output() -> str:
        log.flush()
        return (work / "serve.log").read_text(errors="replace")
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                fail(f"peft-studio serve exited {proc.returncode} before answering", output())
            try:
                call(f"{base}/runs")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    fail(f"peft-studio serve did not answer on port {port} within {SERVE_TIMEOUT_S} s", output())
                time.sleep(1)
        cfg = {"name": "runtime-check-rest", **CONFIGS["minilm-classification"]}
        try:
            rid = call(f"{base}/runs", cfg)["id"]
        except urllib.error.HTTPError as e:
            fail(f"POST /api/runs answered {e.code}: {e.read()[:500]!r}", output())
        deadline, phases, run = time.monotonic() + RUN_TIMEOUT_S, [], {}
        while time.monotonic() < deadline:
            run = call(f"{base}/runs/{rid}")
            if run.get("phase") and (not phases or phases[-1] != run["phase"]):
                phases.append(run["phase"])
            if run["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        if run.get("status") != "succeeded":
            fail(f"run {rid} through the embedded worker ended {run.get('status') or 'unfinished'}: "
                 f"{run.get('error')}", output())
        print(f"ok: run {rid} through REST and the embedded worker succeeded (phases seen: {phases})", flush=True)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main() -> int:
    if not STUDIO.is_file():
        fail(f"{STUDIO} is missing: `make install` did not install the console script")
    check_no_test_extras()
    with tempfile.TemporaryDirectory(prefix="peft-runtime-check-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "STUDIO_DATA_DIR": str(work / "data"), "GRADIO_ANALYTICS_ENABLED": "False",
               "HF_HUB_OFFLINE": "1", "STUDIO_MODEL_CACHE": str(work / "data" / "models")}
        for k in ("STUDIO_DATABASE_URL", "STUDIO_BROKER_URL", "STUDIO_ARTIFACT_URL"):
            env.pop(k, None)     # the defaults: SQLite, the embedded worker, files in the data dir
        train_each(env, work)
        serve_one_run(env, work)
    print("runtime check passed: `make install` alone trains every bundled model and serves runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
