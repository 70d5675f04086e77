"""Files this studio machine derives from a run and keeps outside the artifact store (the
GGUF exports, `<data dir>/gguf/run<id>-*.gguf`), named by one rule here, so deleting a run
(studio.service) removes them without importing the module that builds them (studio.gguf)."""

from __future__ import annotations

from pathlib import Path

from workers.settings import Settings


def gguf_dir(settings: Settings) -> Path:
    return settings.data_dir / "gguf"


def run_gguf_files(settings: Settings, run_id: int) -> list[Path]:
    """The GGUF files kept for a run, by name."""
    folder = gguf_dir(settings)
    return sorted(folder.glob(f"run{int(run_id)}-*.gguf")) if folder.is_dir() else []


def forget_run_files(settings: Settings, run_id: int) -> None:
    """Remove every file this machine derived from the run (the run was deleted)."""
    for p in run_gguf_files(settings, run_id):
        p.unlink(missing_ok=True)
