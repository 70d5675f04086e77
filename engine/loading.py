"""Streaming a safetensors checkpoint straight into a model in the run's dtype, on
the run's device (docs/precision.md, "Loading").

The model is built with its parameters on the meta device (no memory; buffers such
as rotary frequencies are computed as usual). Each tensor of the checkpoint is then
read from the file through one reusable host buffer of `CHUNK_BYTES`, converted
chunk by chunk into a tensor allocated in its final dtype on its final device, and
put in place of the meta parameter. The file is read with `readinto`, never mapped:
pages of a mapped file count as the process's resident memory while touched, so an
fp32 checkpoint mapped to load a bf16 model costs its full fp32 size in RSS. Peak
host memory is therefore the model in its run dtype plus one chunk (plus, on CUDA,
nothing but the chunk).

`module_transform` lets a method replace a module as soon as its own parameters
have arrived (QLoRA quantizes each block linear to NF4 then, so at most one layer
exists in 16 bits at a time). Parameters the checkpoint lacks (a new classification
head) are created and initialised by transformers' own `_init_weights` with the
caller's seed, exactly as `from_pretrained` does; tied parameters stay one tensor.

The safetensors format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data, offsets relative to its start (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from torch import nn

from .precision import ParamMap, fp32_kept, keeps_fp32

CHUNK_BYTES = 8 << 20     # the one host buffer every tensor passes through
MAX_HEADER = 100 << 20    # the format's own limit on the JSON header

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; names the file and tensor."""


@dataclass
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple
    begin: int      # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = struct.unpack("<Q", raw)[0]
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    out = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable or unsupported entry {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if b < 0 or e - b != nbytes or base + e > size:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets {b}..{e} that do not match its "
                                  f"shape {list(shape)} or the file's size")
        out[name] = Entry(path, dtype, shape, base + b, base + e)
    return out


def checkpoint_index(model_dir: Path) -> dict[str, Entry]:
    """Every tensor of a model directory: `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`, or every `*.safetensors` file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        paths = [model_dir / f for f in files]
    elif (model_dir / "model.safetensors").exists():
        paths = [model_dir / "model.safetensors"]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"{model_dir}: no .safetensors weights")
    out: dict[str, Entry] = {}
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the shard index but missing")
        out.update(read_header(p))
    return out


class Reader:
    """Reads tensors through one reusable host buffer; one open file at a time."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.buf = bytearray(chunk_bytes)
        self._path: Optional[Path] = None
        self._f = None

    def _file(self, path: Path):
        if self._path != path:
            self.close()
            self._f, self._path = open(path, "rb"), path
        return self._f

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f, self._path = None, None

    def read(self, e: Entry, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The tensor `e` as a new tensor in `dtype` on `device`."""
        out = torch.empty(e.shape, dtype=dtype, device=device)
        self.read_into(e, out)
        return out

    def read_into(self, e: Entry, out: torch.Tensor) -> None:
        flat = out.view(-1)
        item = torch.empty((), dtype=e.dtype).element_size()
        per = max(1, len(self.buf) // item)
        f = self._file(e.file)
        f.seek(e.begin)
        done, total = 0, flat.numel()
        view = memoryview(self.buf)
        while done < total:
            k = min(per, total - done)
            got = f.readinto(view[:k * item])
            if got != k * item:
                raise CheckpointError(f"{e.file}: ended inside a tensor (read {got} of {k * item} bytes)")
            flat[done:done + k].copy_(torch.frombuffer(self.buf, dtype=e.dtype, count=k))
            done += k


class ModuleTransform(Protocol):
    """Replaces modules as their parameters arrive (e.g. QLoRA's NF4 quantization)."""

    def select(self, model: nn.Module) -> set[str]:
        """Names of the modules to hand to __call__ once their own parameters are loaded."""

    def __call__(self, name: str, module: nn.Module) -> nn.Module:
        """The module to put in place of `module` (it may be `module` itself)."""


def _key_map(model: nn.Module, keys) -> dict[str, str]:
    """checkpoint key -> model key, allowing for the base model prefix (a BertModel
    checkpoint in a BertForSequenceClassification, and back)."""
    own = set(model.state_dict(keep_vars=True).keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for k in keys:
        if k in own:
            out[k] = k
        elif prefix and f"{prefix}.{k}" in own:
            out[k] = f"{prefix}.{k}"
        elif prefix and k.startswith(prefix + ".") and k[len(prefix) + 1:] in own:
            out[k] = k[len(prefix) + 1:]
    return out


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    owners: dict[int, list] = {}
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, attr))
    return owners


def _parent_and_attr(model: nn.Module, key: str) -> tuple[str, nn.Module, str]:
    mod_name, _, attr = key.rpartition(".")
    return mod_name, model.get_submodule(mod_name) if mod_name else model, attr


def load_into(model: nn.Module, model_dir: Path, dtype: torch.dtype, device: torch.device, *,
              transform: Optional[ModuleTransform] = None, seed: int = 0,
              chunk_bytes: int = CHUNK_BYTES) -> ParamMap:
    """Fill `model` (parameters on the meta device, built by `meta_model`) from the
    checkpoint in `model_dir`: floating tensors in `dtype` (those the model keeps in
    fp32 stay fp32), on `device`. Returns each loaded parameter's checkpoint key
    (an engine.precision.ParamMap), so a trainable weight can later be read again in fp32 (`reread_fp32`)."""
    index = checkpoint_index(model_dir)
    kmap = _key_map(model, index)
    owners = _owners(model)
    targets = transform.select(model) if transform is not None else set()
    pending = {n: sum(1 for p in model.get_submodule(n)._parameters.values() if p is not None) for n in targets}
    reader = Reader(chunk_bytes)
    loaded = ParamMap()
    filled: set[int] = set()
    state = model.state_dict(keep_vars=True)
    try:
        # file order, so the reads are sequential
        for ck in sorted(kmap, key=lambda k: (str(index[k].file), index[k].begin)):
            key, e = kmap[ck], index[ck]
            old = state[key]
            if tuple(old.shape) != e.shape:
                raise CheckpointError(f"{e.file}: tensor {ck!r} has shape {list(e.shape)}, the model's "
                                      f"{key!r} has {list(old.shape)}")
            mod_name, mod, attr = _parent_and_attr(model, key)
            if attr in mod._buffers:                      # persistent buffers are real already
                with torch.no_grad():
                    reader.read_into(e, mod._buffers[attr])
                continue
            if id(old) in filled:                         # a tied parameter, filled through its twin
                continue
            filled.add(id(old))
            want = (torch.float32 if keeps_fp32(mod) else dtype) if old.is_floating_point() else old.dtype
            new = nn.Parameter(reader.read(e, want, device), requires_grad=old.requires_grad)
            for m, a in owners.pop(id(old), [(mod, attr)]):   # popped: a module a transform replaces
                m._parameters[a] = new                          # must not stay alive through this map
            del old, mod
            loaded[new] = ck
            if mod_name in pending:
                pending[mod_name] -= 1
                if pending[mod_name] == 0:
                    _replace(model, mod_name, transform(mod_name, model.get_submodule(mod_name)))
                    release_free_memory()
    finally:
        reader.close()
    if hasattr(model, "tie_weights"):   # a tied head the checkpoint leaves out shares its twin's tensor
        missing = {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"}
        if missing:
            model.tie_weights(missing_keys=missing, recompute_mapping=True)
    _init_missing(model, dtype, device, seed, loaded)
    for name, left in pending.items():            # a target whose bias the checkpoint lacked
        if left:
            _replace(model, name, transform(name, model.get_submodule(name)))
    return loaded


_libc = None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim`; a no-op
    elsewhere). A transform frees a layer's 16-bit weight and its temporaries after
    making a smaller tensor; glibc keeps such freed chunks in its heap (its mmap
    threshold grows after the first large free), so without this the resident memory
    of a QLoRA load grows by every layer it quantized (+0.25 GB on SmolLM2-135M)."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if parent._modules.get(child) is not new:
        setattr(parent, child, new)


def _init_missing(model: nn.Module, dtype: torch.dtype, device: torch.device, seed: int,
                  loaded: ParamMap) -> None:
    """Parameters still on meta: created in fp32 on the host, initialised by the model's
    `_init_weights` (only those modules, as `from_pretrained` does), then put in the
    load dtype on the device. Buffers follow to the device."""
    owners = _owners(model)
    missing = [p for p in {id(p): p for p in model.parameters()}.values() if p.device.type == "meta"]
    if missing:
        for p in missing:
            new = nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=p.requires_grad)
            for m, a in owners[id(p)]:
                m._parameters[a] = new
        if hasattr(model, "initialize_weights"):
            for p in model.parameters():
                if p in loaded:
                    p._is_hf_initialized = True
            for m in model.modules():   # only the modules that own a missing parameter are initialised
                if m._parameters:
                    m._is_hf_initialized = all(p in loaded for p in m._parameters.values() if p is not None)
            torch.manual_seed(seed)
            model.initialize_weights()
        kept = fp32_kept(model)
        with torch.no_grad():
            for p in {id(p): p for p in model.parameters()}.values():
                if p not in loaded and p.device.type == "cpu" and p.dtype == torch.float32:
                    p.data = p.data.to(device=device, dtype=torch.float32 if p in kept else dtype)
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[k] = b.to(device)


def meta_model(cls, config, dtype: torch.dtype):
    """`cls` (an Auto* model class) built from `config` with its parameters on the meta
    device in `dtype` and its buffers computed on the host as usual."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls.from_config(config, dtype=dtype)


def reread_fp32(model_dir: Path, keys: ParamMap) -> Callable[[nn.Parameter], Optional[torch.Tensor]]:
    """For `engine.precision.settle_dtypes(exact=...)`: a parameter's checkpoint value in
    fp32 (None for one not loaded from the checkpoint)."""
    index: dict[str, Entry] = {}

    def exact(p: nn.Parameter) -> Optional[torch.Tensor]:
        key = keys.get(p)
        if key is None:
            return None
        if not index:
            index.update(checkpoint_index(model_dir))
        r = Reader()
        try:
            return r.read(index[key], torch.float32, p.device)
        finally:
            r.close()
    return exact
