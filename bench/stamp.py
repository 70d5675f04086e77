"""The stamp every bench/RESULTS-*.md starts with: which code was measured, when, on what.

    from stamp import Stamp
    st = Stamp("bench/engine_vs_peft.py")      # reads the load average before
    st.say("| case | ... |")                    # printed now and kept for the file
    st.write("engine", title="Engine vs peft") # bench/RESULTS-engine.md: stamp (load after) + title + lines

A working tree with uncommitted changes under engine/, studio/, workers/ or bench/ is
marked `+dirty`: such figures describe no commit and must not be quoted.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    # a copy of the tree without .git (the lent GPU machine) is told its commit by the caller,
    # who sends a clean tree at that commit
    if os.environ.get("STUDIO_BENCH_COMMIT"):
        return os.environ["STUDIO_BENCH_COMMIT"].strip()
    sha = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "engine", "studio", "workers", "bench")
    return sha + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Stamp:
    def __init__(self, script: str):
        self.script = script
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_before = _load()
        self.commit = commit()       # the code measured is the code at the start
        self.lines: list[str] = []

    def say(self, line: str = "") -> None:
        """Print a line of results now and keep it for `write`."""
        print(line, flush=True)
        self.lines.append(line)

    def header(self) -> str:
        import torch
        import transformers
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
        return "\n".join([
            f"commit {self.commit}",
            "",
            f"- date: {self.started:%Y-%m-%d %H:%M} UTC; script: `{self.script}`",
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}",
            f"- CPU: {cpu_model()} x {os.cpu_count()}; GPUs: {gpus}",
            f"- load average (1/5/15 min): {self.load_before} before, {_load()} after",
        ])

    def write(self, name: str, body: Optional[str] = None, title: str = "", path: Optional[Path] = None) -> Path:
        """Write bench/RESULTS-<name>.md (or `path`) atomically: the header, the title,
        then `body` (default: the lines said so far)."""
        path = Path(path) if path else REPO / "bench" / f"RESULTS-{name}.md"
        body = "\n".join(self.lines) if body is None else body
        text = self.header() + "\n\n" + (f"# {title}\n\n" if title else "") + body.rstrip() + "\n"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path
