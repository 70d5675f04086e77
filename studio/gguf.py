"""A finished run's merged model as a GGUF file (llama.cpp, Ollama, LM Studio), built
on demand and cached.

`gguf_file(settings, run_id, quant)` takes the run's merged model (the same zip
`GET /api/runs/{id}/merged` serves, built once and kept in the artifact store),
converts it with engine.gguf_export and keeps the file in the data dir under
gguf/run<id>-<adapter sha>-<quant>.gguf. One build per key at a time, across
threads and processes (an exclusive lock file); the file appears under its final
name only when complete, so a half-written file is never served.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from engine.arch import gguf_families, gguf_writable
from workers.settings import Settings

from . import service
from .artifacts import ArtifactError
from .run_files import gguf_dir, run_gguf_files

log = logging.getLogger("peft_studio.gguf")
QUANTS = ("f16", "q8_0")     # engine.gguf_export.QUANTS (kept here so importing this needs no torch)


class BadQuant(ValueError):
    """A quantization name that is not one of QUANTS (a 422)."""


class GGUFUnsupported(ArtifactError):
    """A run whose model GGUF export cannot express (a 409): not a family llama.cpp runs, not a causal LM,
    a tokenizer llama.cpp has no model for."""


def base_architecture(settings: Settings, model: str) -> Optional[str]:
    """The model_type of a run's base model when known without loading it (a bundled or
    tiny model, or a local directory's config.json); None for a hub id."""
    import json

    from engine.models import BUNDLED_MODELS, TINY_MODELS, ModelLoadError, check_local_model_dir

    if model in TINY_MODELS:
        return TINY_MODELS[model]
    if model in BUNDLED_MODELS:
        return BUNDLED_MODELS[model]["family"]
    p = Path(model).expanduser()
    if not p.is_dir():
        return None
    try:
        d = check_local_model_dir(p, settings.model_roots)
        return json.loads((d / "config.json").read_text()).get("model_type")
    except (ModelLoadError, OSError, ValueError):
        return None


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (flock: held per open file, so it excludes other
    threads of this process as well as other processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_exportable(settings: Settings, run: dict) -> None:
    """Refuse, before any merging, a run GGUF export cannot serve."""
    from engine.config import parse_run_config

    cfg = parse_run_config(run["config"])
    arch = base_architecture(settings, cfg.model)
    if arch is not None and not gguf_writable(arch):
        raise GGUFUnsupported(f"GGUF export supports the decoder families llama.cpp runs "
                              f"({', '.join(gguf_families())}); run {run['id']} is {arch}")
    if cfg.task != "causal_lm":
        raise GGUFUnsupported(f"GGUF export needs a causal_lm run; run {run['id']} is {cfg.task}")
    if run["status"] != "succeeded" or not run.get("adapter"):
        raise ArtifactError(f"run {run['id']} is {run['status']}; only succeeded runs can be exported")


def download_name(run: dict, quant: str) -> str:
    return service.safe_filename(f"{run['name']}-{quant}.gguf")


def _drop_stale(folder: Path, run_id: int, keep_prefix: str) -> None:
    """Remove this run's files built from an earlier adapter (a resumed run has a new one)."""
    for p in folder.glob(f"run{run_id}-*.gguf"):
        if not p.name.startswith(keep_prefix):
            p.unlink(missing_ok=True)


def gguf_file(settings: Settings, run_id: int, quant: str) -> tuple[Path, str]:
    """The GGUF file of run `run_id`'s merged model in `quant` (f16 or q8_0) and its
    download name, built on first request. Raises BadQuant, service.NotFound, or
    ArtifactError (GGUFUnsupported for a model GGUF cannot express)."""
    if quant not in QUANTS:
        raise BadQuant(f"quant: {str(quant)[:40]!r} is not one of {', '.join(QUANTS)}")
    run = service.get_run(settings, run_id)
    check_exportable(settings, run)
    folder = gguf_dir(settings)
    prefix = f"run{int(run_id)}-{run['adapter']['sha256'][:16]}-"
    final = folder / f"{prefix}{quant}.gguf"
    with build_lock(folder / f".{prefix}{quant}.lock"):
        if final.is_file():
            return final, download_name(run, quant)
        _build(settings, run, quant, final)
        _drop_stale(folder, run_id, prefix)
    return final, download_name(run, quant)


def _build(settings: Settings, run: dict, quant: str, final: Path) -> None:
    from engine.adapters import extract_zip_safely
    from engine.gguf_export import GGUFExportError, write_gguf

    from .artifacts import merged_zip_path

    zip_path, _name = merged_zip_path(settings, run["id"])
    tmp = Path(tempfile.mkdtemp(prefix=f".merged-run{run['id']}-", dir=final.parent))
    try:
        merged = extract_zip_safely(zip_path, tmp)
        try:
            write_gguf(merged, None, final, quant, name=f"{run['name']} (PEFT Studio run {run['id']})")
        except GGUFExportError as e:
            raise GGUFUnsupported(f"run {run['id']}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("run %s: GGUF %s built (%d bytes, %s)", run["id"], quant, final.stat().st_size, final.name)


def cached(settings: Settings, run_id: int) -> list[str]:
    """Names of the GGUF files kept for a run (for tests and housekeeping)."""
    return [p.name for p in run_gguf_files(settings, run_id)]

