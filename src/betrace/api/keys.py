"""Per-tenant API keys, hashed at rest.

A key is ``btk_<key id>_<secret>``; only a salted SHA-256 of the secret is
stored (the secret is 256 random bits, so a slow KDF adds nothing but request
latency). Keys live in one JSON file (``<data_dir>/apikeys.json``, mode 0600)
so that the CLI can manage them while a worker or ``betrace serve`` is
running: writers take an exclusive ``flock`` and replace the file atomically,
readers reload it when it changes. A key authenticates exactly one tenant.

With a cache (``betrace.cache.api_key_cache``), lookups by key id are
answered from the in-process LRU or Redis. A cached record carries the
file's (mtime, size) stamp and is used only while the file still has that
stamp, so any change of the file -- a revocation by any process, even one
that could not reach Redis -- invalidates every cached record at once;
``revoke`` also deletes the record from the cache. The secret is still
checked against the salted digest on every request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from betrace.errors import BetraceError, ConfigError

if TYPE_CHECKING:
    from betrace.cache.tier import NamedCache

logger = logging.getLogger(__name__)

PREFIX = "btk"
KEYS_FILE = "apikeys.json"
TENANT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DECODED_MAX = 10_000
_TOKEN_RE = re.compile(r"^btk_([0-9a-f]{12})_([A-Za-z0-9_\-]{20,100})$")


class AuthError(BetraceError):
    """No key, an unknown key or a revoked key (HTTP 401)."""

    status = 401


class ForbiddenError(AuthError):
    """A valid key asked for another tenant's data (HTTP 403)."""

    status = 403


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    tenant: str
    name: str
    salt: str
    digest: str
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class ApiKeyStore:
    """The key file: create, list, revoke (CLI) and authenticate (API)."""

    def __init__(self, path: Path, cache: NamedCache | None = None) -> None:
        self.path = path
        self.cache = cache
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ApiKey] = {}
        # The last decoded cache record per key id: an LRU hit returns the same bytes object.
        self._decoded: dict[str, tuple[bytes, tuple[int, ...], ApiKey]] = {}

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _lookup(self, key_id: str) -> ApiKey | None:
        """The record of ``key_id``: cached while the file is unchanged, else from the file."""
        cache = self.cache
        if cache is None:
            with self._lock:
                return self._load().get(key_id)
        stamp = self._file_stamp()
        raw = cache.get(key_id)
        if raw is not None:
            seen = self._decoded.get(key_id)
            if seen is not None and seen[0] is raw:
                if seen[1] == stamp:
                    return seen[2]
            else:
                try:
                    doc = orjson.loads(raw)
                    decoded = (raw, tuple(doc["stamp"]), ApiKey(**doc["key"]))
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    decoded = None  # an unreadable record: read the file
                if decoded is not None:
                    if len(self._decoded) >= _DECODED_MAX:
                        self._decoded.clear()
                    self._decoded[key_id] = decoded
                    if decoded[1] == stamp:
                        return decoded[2]
        with self._lock:
            key = self._load().get(key_id)
            stamp = self._stamp
        if key is not None and stamp is not None:
            cache.set(key_id, orjson.dumps({"stamp": list(stamp), "key": asdict(key)}))
        return key

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_suffix(".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, ApiKey]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._keys = None, {}
            return self._keys
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                doc = orjson.loads(self.path.read_bytes())
                keys = {k["key_id"]: ApiKey(**k) for k in doc.get("keys", [])}
            except (OSError, orjson.JSONDecodeError, TypeError, KeyError) as exc:
                msg = f"API key file {self.path} is unreadable: {exc}"
                raise ConfigError(msg) from exc
            self._stamp, self._keys = stamp, keys
        return self._keys

    def _save(self, keys: dict[str, ApiKey]) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = orjson.dumps(
            {"version": 1, "keys": [asdict(k) for k in keys.values()]}, option=orjson.OPT_INDENT_2
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
        self._stamp = None

    def create(self, tenant: str, name: str = "") -> tuple[ApiKey, str]:
        """A new key for ``tenant``; the returned token is shown once and never stored."""
        if not TENANT_RE.match(tenant):
            msg = f"invalid tenant {tenant!r}: expected [A-Za-z0-9_.-]{{1,64}}"
            raise ConfigError(msg)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        with self._lock, self._exclusive():
            keys = dict(self._load())
            key_id = secrets.token_hex(6)
            while key_id in keys:  # pragma: no cover - 48-bit ids
                key_id = secrets.token_hex(6)
            key = ApiKey(key_id, tenant, name, salt, _digest(salt, secret), _now())
            keys[key_id] = key
            self._save(keys)
        logger.info("created API key %s for tenant %r", key_id, tenant)
        return key, f"{PREFIX}_{key_id}_{secret}"

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        with self._lock:
            keys = self._load()
        return sorted(
            (k for k in keys.values() if tenant is None or k.tenant == tenant), key=lambda k: k.created_at
        )

    def revoke(self, key_id: str, tenant: str) -> bool:
        """Revoke ``key_id`` of ``tenant``; False when no such active key exists."""
        with self._lock, self._exclusive():
            keys = dict(self._load())
            key = keys.get(key_id)
            if key is None or key.tenant != tenant or not key.active:
                return False
            keys[key_id] = replace(key, revoked_at=_now())
            self._save(keys)
        if self.cache is not None:
            self.cache.delete(key_id)
        logger.info("revoked API key %s of tenant %r", key_id, tenant)
        return True

    def authenticate(self, token: str | None) -> ApiKey:
        """The key ``token`` stands for, or :class:`AuthError`; never logs the token."""
        if not token:
            msg = "missing API key: send 'Authorization: Bearer <key>'"
            raise AuthError(msg)
        match = _TOKEN_RE.match(token)
        if match is None:
            msg = "invalid API key"
            raise AuthError(msg)
        key_id, secret = match.groups()
        key = self._lookup(key_id)
        if key is None or not hmac.compare_digest(key.digest, _digest(key.salt, secret)):
            msg = "invalid API key"
            raise AuthError(msg)
        if not key.active:
            msg = f"API key {key_id} was revoked"
            raise AuthError(msg)
        return key
