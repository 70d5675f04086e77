"""The artifact store: where uploaded datasets, checkpoints, adapters and merged
models live, addressed by STUDIO_ARTIFACT_URL so that every machine reaches the
same objects (a local folder, a shared mount, or S3-compatible object storage
through fsspec / s3fs).

The database keeps each object's key, size and sha256; this module moves bytes.
- Writes are atomic: on a file:// store an object is written under `.tmp/` and
  renamed into place; on S3 a single PUT or a multipart upload's completion
  publishes it whole. A failed write leaves nothing under the key.
- Reads are verified: `get_file` hashes what it downloads and refuses an object
  whose sha256 is not the recorded one (`ArtifactCorrupt`).
- Each machine keeps what it downloaded in its own data dir, by sha256, so a
  dataset is fetched once per machine, not once per run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

log = logging.getLogger("peft_studio.store")
CHUNK = 1 << 20
_SECRET_WORDS = ("secret", "password", "token", "key", "signature", "credential")


class StoreError(RuntimeError):
    """The store cannot be used (unreachable, misconfigured, a refused write, a
    missing object); the message names the store by its redacted URL."""


class ArtifactCorrupt(StoreError):
    """An object whose bytes do not match the sha256 the database recorded."""


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    sha256: str


def redact(url: Optional[str]) -> str:
    """A store or endpoint URL fit for logs and errors: no password, no secret query values."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if parts.password is not None or (parts.username and "@" in netloc):
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    query = urlencode([(k, "***" if any(w in k.lower() for w in _SECRET_WORDS) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated, without '..' or empty parts."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"artifact key {key!r} is not a plain relative key")
    return key


def sha256_file(path: str | Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class ArtifactStore:
    """One store, by URL. `cache_dir` is this machine's download cache."""

    def __init__(self, url: str, *, endpoint_url: Optional[str] = None, cache_dir: Optional[Path] = None):
        self.url, self.endpoint_url = url, endpoint_url
        self.shown = redact(url) + (f" (endpoint {redact(endpoint_url)})" if endpoint_url else "")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        parts = urlsplit(url)
        self.protocol = parts.scheme or "file"
        if self.protocol == "file":
            if parts.netloc not in ("", "localhost"):
                raise StoreError(f"artifact store {self.shown}: a file:// URL names a local path "
                                 f"(file:///path), not a host")
            self.root = Path(unquote(parts.path))
            self.fs = None
        elif self.protocol in ("s3", "s3a"):
            if not parts.hostname:
                raise StoreError(f"artifact store {self.shown}: an s3:// URL needs a bucket (s3://bucket/prefix)")
            try:
                import s3fs
            except ImportError:
                raise StoreError(f"artifact store {self.shown}: s3fs is not installed") from None
            kw: dict = {"skip_instance_cache": True, "use_listings_cache": False,
                        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                          "retries": {"max_attempts": 3, "mode": "standard"}}}
            if endpoint_url:
                kw["client_kwargs"] = {"endpoint_url": endpoint_url}
            if parts.username:   # s3://KEY:SECRET@bucket/prefix (prefer the AWS variables)
                kw.update(key=parts.username, secret=parts.password)
            self.fs = s3fs.S3FileSystem(**kw)
            self.root = f"{parts.hostname}/{parts.path.strip('/')}".rstrip("/")
        else:
            raise StoreError(f"artifact store {self.shown}: unsupported scheme {self.protocol!r}; "
                             f"use file:///path or s3://bucket/prefix")

    # ------------------------------------------------------------------ paths

    def _path(self, key: str):
        check_key(key)
        return self.root / key if self.fs is None else f"{self.root}/{key}"

    def _fail(self, what: str, key: str, e: BaseException) -> StoreError:
        return StoreError(f"artifact store {self.shown}: {what} {key!r} failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ writes

    def put_file(self, key: str, local: str | Path) -> Stored:
        """Publish a local file under `key`, whole or not at all."""
        sha, size = sha256_file(local)
        dest = self._path(key)
        try:
            if self.fs is None:
                tmp_dir = self.root / ".tmp"
                tmp_dir.mkdir(parents=True, exist_ok=True)
                tmp = tmp_dir / f"{uuid.uuid4().hex}"
                try:
                    with open(local, "rb") as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                        out.flush()
                        os.fsync(out.fileno())
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                self.fs.put_file(str(local), dest)
        except Exception as e:
            raise self._fail("writing", key, e) from e
        return Stored(key, size, sha)

    def put_bytes(self, key: str, data: bytes) -> Stored:
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=self.scratch_dir())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.put_file(key, tmp)
        finally:
            os.unlink(tmp)

    def delete(self, key: str) -> None:
        """Remove an object (absent is fine)."""
        try:
            if self.fs is None:
                self._path(key).unlink(missing_ok=True)
            elif self.fs.exists(self._path(key)):
                self.fs.rm_file(self._path(key))
        except Exception as e:
            raise self._fail("deleting", key, e) from e

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder-like key ending in '/'), sorted; [] when none."""
        check_key(prefix.rstrip("/"))
        try:
            if self.fs is None:
                base = self.root / prefix
                if not base.is_dir():
                    return []
                return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())
            base = f"{self.root}/{prefix.rstrip('/')}"
            if not self.fs.exists(base):
                return []
            self.fs.invalidate_cache(base)
            return sorted(k[len(self.root) + 1:] for k in self.fs.find(base))
        except Exception as e:
            raise self._fail("listing", prefix, e) from e

    # ------------------------------------------------------------------ reads

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file() if self.fs is None else bool(self.fs.exists(self._path(key)))
        except Exception as e:
            raise self._fail("looking up", key, e) from e

    def open(self, key: str) -> BinaryIO:
        """A binary reader of the object as stored (unverified; prefer get_file)."""
        try:
            return open(self._path(key), "rb") if self.fs is None else self.fs.open(self._path(key), "rb")
        except FileNotFoundError:
            raise StoreError(f"artifact store {self.shown}: object {key!r} is missing") from None
        except Exception as e:
            raise self._fail("reading", key, e) from e

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def get_file(self, key: str, sha256: str, suffix: str = "") -> Path:
        """A local, verified copy of the object: from this machine's cache when it
        holds these bytes, else downloaded, hashed and refused unless the sha256
        is the recorded one. The name ends in `suffix` (readers pick parsers by it)."""
        cache = self.scratch_dir()
        final = cache / f"{sha256}{suffix}"
        if final.is_file():
            return final
        fd, tmp = tempfile.mkstemp(prefix=".get-", dir=cache)
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_bytes(key):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != sha256:
                raise ArtifactCorrupt(
                    f"artifact {key!r} in store {self.shown} is corrupt: its sha256 is {h.hexdigest()}, the "
                    f"database recorded {sha256}; it was changed or damaged in the store and is refused")
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return final

    def presigned_url(self, key: str, expires_s: int = 3600) -> Optional[str]:
        """A time-limited URL a client can download the object from (S3 only)."""
        if self.fs is None:
            return None
        try:
            return self.fs.sign(self._path(key), expiration=expires_s)
        except Exception as e:
            raise self._fail("signing", key, e) from e

    # ------------------------------------------------------------------ health

    def check(self) -> None:
        """Write, read back and delete a probe object; a StoreError names what failed."""
        key = f".probe/{uuid.uuid4().hex}"
        try:
            self.put_bytes(key, b"peft-studio probe")
            with self.open(key) as f:
                if f.read() != b"peft-studio probe":
                    raise StoreError(f"artifact store {self.shown}: a probe object read back different bytes")
            self.delete(key)
        except StoreError as e:
            raise StoreError(f"artifact store {self.shown} is not usable: {e}".replace(
                f"artifact store {self.shown}: ", "", 1)) from None

    def scratch_dir(self) -> Path:
        d = self.cache_dir or Path(tempfile.gettempdir()) / "peft-studio-artifacts"
        d.mkdir(parents=True, exist_ok=True)
        return d


_STORES: dict = {}


def get_store(settings) -> ArtifactStore:
    """The store of these settings (one per process and URL)."""
    key = (settings.artifact_url, settings.s3_endpoint_url, str(settings.cache_dir), os.getpid())
    st = _STORES.get(key)
    if st is None:
        st = _STORES[key] = ArtifactStore(settings.artifact_url, endpoint_url=settings.s3_endpoint_url,
                                          cache_dir=settings.cache_dir)
    return st
