"""Per-user API keys (table `api_keys`, migration 0008): create, list, revoke, and find
the owner of a presented key.

A key is `pst-` and 32 random bytes in URL-safe base64 (`secrets.token_urlsafe`), shown
once at creation. Only its sha256 is stored: with 256 random bits a plain hash is
enough (no salt or slow hash is needed against guessing), and the database never
holds anything that opens the studio. The first characters (`prefix`) are kept so a
person can tell their keys apart in a list. Revoking keeps the row (with the time)
so the list shows what was revoked; a revoked key opens nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Optional

from sqlalchemy import select

from . import db

KEY_PREFIX = "pst-"
SHOWN = 12                    # characters of the key kept for display
MAX_NAME = 100
MAX_KEYS_PER_USER = 100


class ApiKeyError(ValueError):
    """A bad key name, or too many keys; the message names the field."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ApiKeyError("name: give the key a name (what it is for)")
    if len(name) > MAX_NAME or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        raise ApiKeyError(f"name: at most {MAX_NAME} printable characters")
    return name


def as_dict(row: db.ApiKey) -> dict:
    return {"id": row.id, "name": row.name, "owner": row.owner, "prefix": row.prefix,
            "created_at": row.created_at.isoformat() + "Z" if row.created_at else None,
            "revoked_at": row.revoked_at.isoformat() + "Z" if row.revoked_at else None}


def create_key(url: str, owner: Optional[str], name: str) -> tuple[dict, str]:
    """A new key for `owner`: (its row as a dict, the key itself, shown only now)."""
    name = check_name(name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.transaction(url) as s:
        q = select(db.ApiKey).where(db.ApiKey.owner == owner, db.ApiKey.revoked_at.is_(None))
        if len(s.scalars(q).all()) >= MAX_KEYS_PER_USER:
            raise ApiKeyError(f"name: {owner or 'this studio'} already has {MAX_KEYS_PER_USER} keys; revoke some first")
        row = db.ApiKey(owner=owner, name=name, prefix=key[:SHOWN], key_hash=key_hash(key))
        s.add(row)
        s.flush()
        return as_dict(row), key


def list_keys(url: str, owner: Optional[str], *, everyone: bool = False) -> list[dict]:
    """`owner`'s keys, newest first (`everyone`: all users' keys)."""
    with db.transaction(url) as s:
        q = select(db.ApiKey).order_by(db.ApiKey.id.desc())
        if not everyone:
            q = q.where(db.ApiKey.owner == owner)
        return [as_dict(r) for r in s.scalars(q)]


def revoke_key(url: str, owner: Optional[str], key_id: int, *, everyone: bool = False) -> bool:
    """Revoke `owner`'s key `key_id` (`everyone`: anyone's); False if there is no such
    key of theirs. Revoking a revoked key is a no-op that answers True."""
    if not 0 < int(key_id) < 2**31:
        return False
    with db.transaction(url) as s:
        row = s.get(db.ApiKey, int(key_id))
        if row is None or (not everyone and row.owner != owner):
            return False
        if row.revoked_at is None:
            row.revoked_at = db.utcnow()
        return True


def owner_of(url: str, key: str) -> Optional[tuple[Optional[str], int]]:
    """(owner, key id) of a valid, unrevoked key, else None."""
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    with db.transaction(url) as s:
        row = s.scalar(select(db.ApiKey).where(db.ApiKey.key_hash == key_hash(key)))
        if row is None or row.revoked_at is not None:
            return None
        return row.owner, row.id
