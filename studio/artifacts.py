"""Things built from a finished run on demand: the trained model rebuilt from
the base model and the stored adapter zip (for the playground and merging), and
a zip of the merged model for methods that merge into the base weights."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Optional

from workers.settings import Settings

from . import service

log = logging.getLogger("peft_studio.artifacts")
_BUILD_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class ArtifactError(ValueError):
    """A run whose artifact cannot be built; the message says why."""


def adapter_dir_for(settings: Settings, run_id: int, dest: Path) -> Path:
    """Unpack run `run_id`'s adapter zip into `dest` (safely: plain files only)."""
    from engine.adapters import extract_zip_safely

    data, _name = service.get_adapter(settings, run_id)
    return extract_zip_safely(data, dest)


def adapter_labels(adapter_dir: Path) -> list[str]:
    meta_path = adapter_dir / "peft_studio.json"
    if not meta_path.exists():
        return []
    return list(json.loads(meta_path.read_text()).get("labels") or [])


def load_base(settings: Settings, cfg, labels: list[str]):
    """The base model of a run, as the worker loaded it (same seed, same labels)."""
    from engine.models import load_model

    id2label = dict(enumerate(labels)) if cfg.task == "classification" and labels else None
    return load_model(cfg.model, cfg.task, num_labels=max(2, len(labels)), allowed_roots=settings.model_roots,
                      cache_dir=settings.models_dir, seed=cfg.training.seed, id2label=id2label)


def load_adapter_into(model, cfg, adapter_dir: Path):
    """Put the trained adapter of a run into its freshly loaded base model.
    peft-format LoRA/DoRA/IA3 go through the engine's peft importers; other
    methods are applied from the run config and their weights loaded by name."""
    from safetensors.torch import load_file

    from engine.adapters import OWN_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, load_own_adapter, load_peft_adapter_into, \
        load_peft_tensors, read_peft_config
    from engine.methods import ApplyContext, get_method
    from engine.prepare import apply_method

    spec = get_method(cfg.method.name)
    if (adapter_dir / PEFT_CONFIG).exists():
        peft_type = read_peft_config(adapter_dir).get("peft_type")
        if peft_type in ("LORA", "IA3") and cfg.method.name != "qlora":
            return load_peft_adapter_into(model, adapter_dir, seed=cfg.training.seed)
        ctx = ApplyContext(task=cfg.task, seed=cfg.training.seed)
        model = apply_method(model, spec, cfg.method, ctx)
        tensors = load_file(str(adapter_dir / PEFT_WEIGHTS))
        if spec.load_state is not None:
            spec.load_state(model, tensors)
        else:
            load_peft_tensors(model, tensors)
        return model
    if not (adapter_dir / OWN_WEIGHTS).exists():
        raise ArtifactError("the adapter zip holds neither adapter_model.safetensors nor studio_adapter.safetensors")
    ctx = ApplyContext(task=cfg.task, seed=cfg.training.seed)
    model = apply_method(model, spec, cfg.method, ctx)
    if spec.load_state is not None:
        spec.load_state(model, load_file(str(adapter_dir / OWN_WEIGHTS)))
    else:
        load_own_adapter(model, adapter_dir)
    return model


def load_trained(settings: Settings, run_id: int):
    """(Prepared, base LoadedModel-free) — the run's model with its adapter, in eval mode.
    Returns an engine Prepared so engine helpers (merge, export) apply."""
    from engine.config import parse_run_config
    from engine.data import Examples
    from engine.methods import ApplyContext, count_parameters, get_method
    from engine.prepare import Prepared

    run = service.get_run(settings, run_id)
    if run["status"] != "succeeded":
        raise ArtifactError(f"run {run_id} is {run['status']}; only succeeded runs have a trained adapter")
    cfg = parse_run_config(run["config"])
    tmp = Path(tempfile.mkdtemp(prefix=f"adapter-run{run_id}-"))
    try:
        d = adapter_dir_for(settings, run_id, tmp)
        labels = adapter_labels(d)
        loaded = load_base(settings, cfg, labels)
        model = load_adapter_into(loaded.model, cfg, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    spec = get_method(cfg.method.name)
    n_params, n_trainable = count_parameters(model)
    return Prepared(cfg, model, loaded.tokenizer, Examples(cfg.task, [], [], labels), spec,
                    ApplyContext(task=cfg.task, seed=cfg.training.seed, tokenizer=loaded.tokenizer),
                    n_params, n_trainable)


def merged_name(run: dict) -> str:
    return service.safe_filename(f"{run['name']}-run{run['id']}-{run['method']}-merged.zip")


def merged_readme(run: dict) -> str:
    auto = "AutoModelForSequenceClassification" if run["task"] == "classification" else "AutoModelForCausalLM"
    return (f"# {run['name']} — merged model (PEFT Studio run {run['id']})\n\n"
            f"The `{run['method']}` adapter merged into the weights of `{run['model']}`: a plain Transformers "
            f"model, no adapter library needed.\n\n```python\nfrom transformers import {auto}\n"
            f"model = {auto}.from_pretrained('path/to/this/unzipped/folder')\n```\n")


def zip_dir(d: Path, extra: Optional[dict[str, bytes]] = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p in sorted(d.iterdir()):
            if p.is_file():
                z.write(p, p.name)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def _lock_for(run_id: int) -> threading.Lock:
    with _LOCKS_GUARD:
        return _BUILD_LOCKS.setdefault(run_id, threading.Lock())


def merged_zip_path(settings: Settings, run_id: int) -> tuple[Path, str]:
    """Build (once per adapter) and return the merged model zip of a run: its path and download name."""
    from engine.adapters import merged_model_files
    from engine.methods import get_method

    run = service.get_run(settings, run_id)
    spec = get_method(run["method"])
    if not spec.mergeable or spec.merge is None:
        raise ArtifactError(f"run {run_id}: method {run['method']!r} does not merge into the base weights; "
                            f"download the adapter instead")
    if run["status"] != "succeeded" or not run.get("adapter"):
        raise ArtifactError(f"run {run_id} is {run['status']}; only succeeded runs can be merged")
    out_dir = settings.data_dir / "merged"
    out = out_dir / f"run{run_id}-{run['adapter']['sha256'][:16]}.zip"
    with _lock_for(run_id):
        if out.exists():
            return out, merged_name(run)
        prep = load_trained(settings, run_id)
        merged = merged_model_files(prep)
        try:
            readme = merged_readme(run).encode()
            cfg = json.dumps(run["config"], indent=2).encode()
            data = zip_dir(merged, {"README.md": readme, "run_config.json": cfg})
        finally:
            shutil.rmtree(merged, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".merged-", dir=out_dir)
        with open(fd, "wb") as f:
            f.write(data)
        Path(tmp).replace(out)
        log.info("run %s: merged model built (%d bytes)", run_id, len(data))
    return out, merged_name(run)
