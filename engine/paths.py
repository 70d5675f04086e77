"""Where PEFT Studio keeps its files on this machine: the one home of the data-dir
default (the engine's model cache and the workers' settings both read it)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "STUDIO_DATA_DIR"
DEFAULT_DATA_DIR = "~/.peft-studio"


def default_data_dir() -> Path:
    """STUDIO_DATA_DIR when set (and not empty), else ~/.peft-studio."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()
