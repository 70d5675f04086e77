"""Saving and loading trained adapters.

Methods with a peft export write peft's on-disk format: `adapter_config.json`
and `adapter_model.safetensors` (keys `base_model.model.<module path>...`), which
`peft.PeftModel.from_pretrained` loads as-is. Our own metadata (run config,
counts, metrics, versions) goes to `peft_studio.json`, never into
`adapter_config.json`. Methods without a peft equivalent write
`studio_adapter.safetensors` (every trainable tensor by module path) with the
same metadata; that round trip is exact.

Files are written to a temporary directory and renamed into place, so a reader
never sees half an adapter. Only safetensors are ever read back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import head_modules
from .methods.base import Family, QuantizedLayer, WrapsBaseLayer
from .methods.reparam import copy_named_tensors
from .prepare import Prepared
from .tasks import TaskSet

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
OWN_WEIGHTS = "studio_adapter.safetensors"
METADATA = "peft_studio.json"
TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


class AdapterError(ValueError):
    pass


def base_model_id(prep: Prepared) -> str:
    return str(getattr(prep.model.config, "name_or_path", "") or prep.config.model)


PROMPT_LEARNING_TYPES = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}


def head_prefix(peft_type: str) -> str:
    """Where peft keeps modules_to_save: prompt-learning PeftModels wrap the model
    directly (`base_model.<head>`), tuner-based ones one level deeper."""
    return "base_model." if peft_type in PROMPT_LEARNING_TYPES else "base_model.model."


def head_tensors(prep: Prepared, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """Classification-head weights under peft's modules_to_save keys."""
    if prep.config.task != "classification" or not prep.spec.trains_head:
        return {}
    out = {}
    for name, head in head_modules(prep.model):
        for pname, p in head.named_parameters():
            out[f"{prefix}{name}.{pname}"] = p.detach()
    return out


def adapter_files(prep: Prepared) -> dict[str, bytes]:
    """The files of the adapter, by name, as bytes."""
    meta = {
        "format": "peft" if prep.spec.peft_export else "peft-studio",
        "method": prep.spec.name,
        "paper": prep.spec.paper,
        "mergeable": prep.spec.mergeable,
        "run_config": prep.config.to_dict(),
        "base_model": base_model_id(prep),
        "task": prep.config.task,
        "labels": prep.examples.labels if prep.examples else [],
        # a multi-task run: its tasks in order and each one's labels (one head per classification task)
        **({"tasks": prep.tasks.names, "task_labels": prep.tasks.labels} if prep.tasks is not None else {}),
        "n_params": prep.n_params,
        "n_trainable": prep.n_trainable,
        "torch_version": torch.__version__,
    }
    files: dict[str, bytes] = {}
    if prep.spec.peft_export:
        exp = prep.spec.peft_export(prep.model, prep.config.method, prep.ctx)
        cfg = dict(exp.adapter_config)
        cfg.setdefault("task_type", TASK_TYPES[prep.config.task])
        cfg["base_model_name_or_path"] = base_model_id(prep)
        tensors = dict(exp.tensors)
        prefix = head_prefix(str(cfg.get("peft_type", "")))
        heads = head_tensors(prep, prefix)
        if heads:
            cfg["modules_to_save"] = sorted({k[len(prefix):].split(".")[0] for k in heads})
            # a method may have written its head under another prefix: keep only peft's
            tensors = {k: v for k, v in tensors.items()
                       if not any(k.endswith(h[len(prefix) - 1:]) and k not in heads for h in heads)}
            tensors.update(heads)
        files[PEFT_CONFIG] = json.dumps(cfg, indent=2, sort_keys=True).encode()
        files[PEFT_WEIGHTS] = safetensors_bytes(tensors)
    else:
        tensors = {n: p.detach() for n, p in prep.model.named_parameters() if p.requires_grad}
        files[OWN_WEIGHTS] = safetensors_bytes(tensors)
    files[METADATA] = json.dumps(meta, indent=2, sort_keys=True).encode()
    return files


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_file(clean, tmp)
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


def write_dir_atomic(out_dir: str | Path, files: dict[str, bytes]) -> Path:
    """Write `files` into out_dir (created); existing files of the same names are
    replaced only once every new file is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
    return out


def save_adapter(prep: Prepared, out_dir: str | Path, extra_files: Optional[dict[str, bytes]] = None) -> Path:
    files = adapter_files(prep)
    if extra_files:
        files.update(extra_files)
    return write_dir_atomic(out_dir, files)


def zip_files(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            z.writestr(name, files[name])
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()




def read_peft_config(d: Path) -> dict:
    try:
        cfg = json.loads((d / PEFT_CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{d}: no {PEFT_CONFIG}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{d}: {PEFT_CONFIG} is not valid JSON: {e}") from None
    if not (d / PEFT_WEIGHTS).exists():
        raise AdapterError(f"{d}: no {PEFT_WEIGHTS} (pickled adapter_model.bin files are not loaded)")
    return cfg


def task_of_peft_config(cfg: dict) -> str:
    return "classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"


def lora_config_from_peft(cfg: dict):
    """Our LoRA/DoRA config for a peft LORA adapter_config.json (rank, alpha,
    rsLoRA, DoRA, rank_pattern, alpha_pattern, target modules, and target_parameters:
    LoRA on mixture-of-experts tensors, engine.methods.expert_lora)."""
    from .methods.dora import DoraConfig
    from .methods.lora import LoraConfig

    unsupported = [k for k in ("layers_to_transform", "layer_replication") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if cfg.get("lora_bias"):
        unsupported.append("lora_bias")
    if unsupported:
        raise AdapterError(f"peft LoRA adapter uses options the engine does not import: {', '.join(unsupported)}")
    targets = cfg.get("target_modules")
    if not targets:
        raise AdapterError("adapter_config.json: no target_modules")
    cls = DoraConfig if cfg.get("use_dora") else LoraConfig
    try:
        return cls(r=cfg["r"], alpha=cfg.get("lora_alpha", cfg["r"]), dropout=0.0,
                   target_modules=targets if isinstance(targets, str) else list(targets),
                   use_rslora=bool(cfg.get("use_rslora")), rank_pattern=cfg.get("rank_pattern") or {},
                   alpha_pattern=cfg.get("alpha_pattern") or {},
                   target_parameters=list(cfg["target_parameters"]) if cfg.get("target_parameters") else None)
    except Exception as e:   # pydantic ValidationError or bad values
        raise AdapterError(f"adapter_config.json: {e}") from None


def load_peft_lora_into(model: nn.Module, adapter_dir: str | Path, seed: int = 0) -> nn.Module:
    """Import a peft-format LoRA adapter (ours or peft's; rsLoRA, DoRA,
    rank_pattern/alpha_pattern, Conv1D fan-in/fan-out) into a plain base model:
    injects the layers per adapter_config.json and loads the tensors strictly."""
    from .methods import ApplyContext
    from .methods.dora import apply_dora
    from .methods.lora import apply_lora

    d = Path(adapter_dir)
    cfg = read_peft_config(d)
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{d}: peft_type {cfg.get('peft_type')!r} is not LORA")
    lcfg = lora_config_from_peft(cfg)
    ctx = ApplyContext(task=task_of_peft_config(cfg), seed=seed)
    (apply_dora if cfg.get("use_dora") else apply_lora)(model, lcfg, ctx)
    load_peft_tensors(model, load_file(str(d / PEFT_WEIGHTS)), require_all=True)
    return model


def load_peft_ia3_into(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Import a peft-format IA3 adapter into a plain base model."""
    from .methods import ApplyContext
    from .methods.ia3 import IA3Config, apply_ia3

    d = Path(adapter_dir)
    cfg = read_peft_config(d)
    if cfg.get("peft_type") != "IA3":
        raise AdapterError(f"{d}: peft_type {cfg.get('peft_type')!r} is not IA3")
    t, ff = cfg.get("target_modules"), cfg.get("feedforward_modules") or []
    icfg = IA3Config(target_modules=t if isinstance(t, str) else list(t),
                     feedforward_modules=ff if isinstance(ff, str) else list(ff))
    apply_ia3(model, icfg, ApplyContext(task=task_of_peft_config(cfg)))
    load_peft_tensors(model, load_file(str(d / PEFT_WEIGHTS)), require_all=True)
    return model


def reparam_importers() -> dict:
    """peft_type -> method module for the formats whose modules import themselves
    (each has `PEFT_TYPE`, `SPEC` and `config_from_peft(adapter_config)`)."""
    from .methods import loha, lokr, oft, vera

    return {m.PEFT_TYPE: m for m in (loha, lokr, vera, oft)}


def load_peft_reparam_into(model: nn.Module, adapter_dir: str | Path, seed: int = 0) -> nn.Module:
    """Import a peft LOHA / LOKR / VERA / OFT adapter (ours or peft's) into a plain base
    model: the method's config from adapter_config.json, its layers, its tensors strictly."""
    from .methods import ApplyContext

    d = Path(adapter_dir)
    cfg = read_peft_config(d)
    mod = reparam_importers().get(cfg.get("peft_type"))
    if mod is None:
        raise AdapterError(f"{d}: peft_type {cfg.get('peft_type')!r} is not one of {', '.join(reparam_importers())}")
    if not cfg.get("target_modules"):
        raise AdapterError("adapter_config.json: no target_modules")
    try:
        mcfg = mod.config_from_peft(cfg)
    except Exception as e:   # pydantic ValidationError or options we do not import
        raise AdapterError(f"adapter_config.json: {e}") from None
    mod.SPEC.apply(model, mcfg, ApplyContext(task=task_of_peft_config(cfg), seed=seed))
    mod.SPEC.load_state(model, load_file(str(d / PEFT_WEIGHTS)))
    return model


def load_peft_adapter_into(model: nn.Module, adapter_dir: str | Path, seed: int = 0) -> nn.Module:
    """Import a peft LoRA / DoRA / IA3 / LoHa / LoKr / VeRA / OFT adapter by its peft_type."""
    cfg = read_peft_config(Path(adapter_dir))
    if cfg.get("peft_type") == "IA3":
        return load_peft_ia3_into(model, adapter_dir)
    if cfg.get("peft_type") in reparam_importers():
        return load_peft_reparam_into(model, adapter_dir, seed)
    return load_peft_lora_into(model, adapter_dir, seed)


ADAPTER_PARAM_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".ia3_l")


def load_peft_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], require_all: bool = False) -> None:
    """Copy peft-keyed tensors (`base_model.model.<path>`; `.lora_A.weight` or
    `.lora_A.default.weight`) into the model's parameters, strictly: every tensor
    must fit a parameter and, with `require_all`, every adapter parameter of the
    model must receive a tensor."""
    loaded = copy_named_tensors(model, tensors, AdapterError)
    if require_all:
        unset = [n for n, _ in model.named_parameters()
                 if any(m in n + "." for m in ADAPTER_PARAM_MARKERS) and n not in loaded]
        if unset:
            raise AdapterError(f"adapter lacks tensors for {len(unset)} adapter parameters, e.g. {unset[:3]}")


def load_own_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Load `studio_adapter.safetensors` into a model that already has the method applied."""
    d = Path(adapter_dir)
    tensors = load_file(str(d / OWN_WEIGHTS))
    params = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in params]
    if unknown:
        raise AdapterError(f"adapter tensors match nothing in the model: {unknown[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


def extract_zip_safely(data: bytes | str | Path, dest: str | Path, max_total: int = 4 << 30) -> Path:
    """Unpack an adapter zip (bytes, or a zip file's path): plain files only, no paths, bounded size."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as z:
        total = 0
        for info in z.infolist():
            name = info.filename
            if info.is_dir() or "/" in name or "\\" in name or name.startswith(".") or name in ("", ".."):
                raise AdapterError(f"adapter zip: refusing entry {name!r}")
            total += info.file_size
            if total > max_total:
                raise AdapterError("adapter zip: too large when unpacked")
            with z.open(info) as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return dest




def merged_model_files(prep: Prepared) -> Path:
    """Merge the adapter into the base weights and save a plain model directory
    (safetensors + config + tokenizer) in a temporary directory."""
    if not prep.spec.mergeable or prep.spec.merge is None:
        raise AdapterError(f"method {prep.spec.name!r} cannot be merged into the base weights")
    prep.spec.merge(prep.model)
    leftovers = [n for n, m in prep.model.named_modules() if isinstance(m, (WrapsBaseLayer, QuantizedLayer))]
    if leftovers:
        raise AdapterError(f"method {prep.spec.name!r}: merge left adapter layers in place: {leftovers[:3]}")
    for p in prep.model.parameters():
        p.requires_grad_(False)
    tmp = Path(tempfile.mkdtemp(prefix="merged-"))
    try:
        prep.model.save_pretrained(tmp, safe_serialization=True)
        if prep.tokenizer is not None:
            prep.tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def adapter_labels(adapter_dir: str | Path) -> list[str]:
    """The class labels a classification adapter was trained with (from peft_studio.json)."""
    meta_path = Path(adapter_dir) / METADATA
    if not meta_path.exists():
        return []
    return list(json.loads(meta_path.read_text()).get("labels") or [])


def adapter_task_labels(adapter_dir: str | Path) -> dict[str, list[str]]:
    """A multi-task adapter's labels per task (from peft_studio.json); {} for one task."""
    meta_path = Path(adapter_dir) / METADATA
    if not meta_path.exists():
        return {}
    return dict(json.loads(meta_path.read_text()).get("task_labels") or {})


def install_saved_task_heads(model: nn.Module, cfg, adapter_dir: Path) -> None:
    """A multi-task classification run's per-task heads, shaped by the labels it saved."""
    if not cfg.dataset.tasks or cfg.task != "classification":
        return
    from .tasks import install_task_heads

    saved = adapter_task_labels(adapter_dir)
    missing = [n for n in cfg.dataset.task_names if n not in saved]
    if missing:
        raise AdapterError(f"{adapter_dir}: {METADATA} has no labels for task {missing[0]!r}")
    install_task_heads(model, [max(2, len(saved[n])) for n in cfg.dataset.task_names], seed=cfg.training.seed)


def load_adapter(model: nn.Module, cfg, adapter_dir: str | Path) -> nn.Module:
    """Put the trained adapter in `adapter_dir` into `model`, its freshly loaded base
    model, for run config `cfg`. A peft-format LoRA/DoRA/IA3 adapter goes through the
    peft importers (the layers are built from adapter_config.json); every other
    method is applied from the run config and its tensors loaded by name (the
    method's own `load_state` when it has one). Returns the model to use."""
    from .methods import ApplyContext, get_method
    from .prepare import apply_method

    d = Path(adapter_dir)
    spec = get_method(cfg.method.name)
    install_saved_task_heads(model, cfg, d)
    if (d / PEFT_CONFIG).exists():
        peft_type = read_peft_config(d).get("peft_type")
        # the peft importers rebuild full-precision layers: a quantized base (QLoRA's NF4)
        # is applied by its own method instead, then gets the same tensors
        if peft_type in ("LORA", "IA3") and spec.family in (Family.LORA, Family.IA3) and not spec.quantizes_base:
            return load_peft_adapter_into(model, d, seed=cfg.training.seed)
        tensors = load_file(str(d / PEFT_WEIGHTS))
        model = apply_method(model, spec, cfg.method, ApplyContext(task=cfg.task, seed=cfg.training.seed))
        if spec.load_state is not None:
            spec.load_state(model, tensors)
        else:
            load_peft_tensors(model, tensors)
        return model
    if not (d / OWN_WEIGHTS).exists():
        raise AdapterError(f"{d}: holds neither {PEFT_WEIGHTS} nor {OWN_WEIGHTS}")
    model = apply_method(model, spec, cfg.method, ApplyContext(task=cfg.task, seed=cfg.training.seed))
    if spec.load_state is not None:
        spec.load_state(model, load_file(str(d / OWN_WEIGHTS)))
    else:
        load_own_adapter(model, d)
    return model


def load_base(cfg, labels: list[str], *, allowed_roots=None, cache_dir: Optional[Path] = None):
    """The base model of run config `cfg` as its worker loaded it (same seed, same
    class labels): an engine.models.LoadedModel."""
    from .models import load_model

    id2label = dict(enumerate(labels)) if cfg.task == "classification" and labels else None
    return load_model(cfg.model, cfg.task, num_labels=max(2, len(labels)), allowed_roots=allowed_roots,
                      cache_dir=cache_dir, seed=cfg.training.seed, id2label=id2label)


def load_trained(cfg, adapter_dir: str | Path, *, allowed_roots=None, cache_dir: Optional[Path] = None) -> Prepared:
    """A finished run rebuilt from its base model and its adapter directory, in eval
    mode, as a Prepared (so merging and export apply). It holds no training rows:
    `examples` carries only the class labels."""
    from .data import Examples
    from .methods import ApplyContext, count_parameters, get_method

    labels = adapter_labels(adapter_dir)
    loaded = load_base(cfg, labels, allowed_roots=allowed_roots, cache_dir=cache_dir)
    model = load_adapter(loaded.model, cfg, adapter_dir)
    model.eval()
    n_params, n_trainable = count_parameters(model)
    tasks = None
    if cfg.dataset.tasks:
        saved = adapter_task_labels(adapter_dir)
        tasks = TaskSet(cfg.dataset.task_names, [Examples(cfg.task, [], [], saved.get(n, [])) for n in
                                                 cfg.dataset.task_names], temperature=cfg.dataset.sampling_temperature)
    return Prepared(cfg, model, loaded.tokenizer, Examples(cfg.task, [], [], labels), get_method(cfg.method.name),
                    ApplyContext(task=cfg.task, seed=cfg.training.seed, tokenizer=loaded.tokenizer),
                    n_params, n_trainable, tasks=tasks)
