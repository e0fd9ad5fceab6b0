"""Who may call: API keys (plain ones from the settings, salted hashes from a keys file), what
each key is scoped to (models, routes, QuantCDN organisations), and its limits (requests and
tokens per minute, concurrent streams), enforced here for every dialect.

The HTTP layer authenticates a request into a `Caller` and puts it in `current_caller`; the
engine's checks (model scope on every lease, tokens charged when a reply finishes, streams
counted while they run) read it from there, so no dialect repeats them.
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.core import metrics
from engine.core.errors import EmberError, OverloadedError

HASH_SCHEME = "sha256"
WINDOW_S = 60.0


class RateLimitedError(OverloadedError):
    """A key's own limit (not the server's queue) was reached."""

    code = "rate_limit_exceeded"


class KeyFileError(EmberError):
    """The keys file cannot be used; the server refuses to start rather than run open."""


def hash_key(key: str, salt: str | None = None) -> str:
    """`sha256$<salt>$<digest>`: what a keys file stores instead of the key. API keys are long
    random tokens, so one salted SHA-256 suffices (a slow password hash would cost every
    request milliseconds)."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.sha256(f"{salt}${key}".encode()).hexdigest()
    return f"{HASH_SCHEME}${salt}${digest}"


def matching_index(pairs: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The index of the first (presented, accepted) pair that matches. Every pair is compared,
    each in constant time, so timing tells nothing of which key is close."""
    matches = [secrets.compare_digest(given, accepted) for given, accepted in pairs]
    return matches.index(True) if any(matches) else None


def new_key() -> str:
    return "ember-" + secrets.token_urlsafe(32)


class KeyEntry(BaseModel):
    """One key of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    hash: str = Field(pattern=r"^sha256\$[0-9a-f]{8,}\$[0-9a-f]{64}$")
    models: list[str] | None = Field(None, description="model ids or aliases; none = all")
    routes: list[str] | None = Field(None, description="path globs (/v1/chat/*); none = all")
    organizations: list[str] | None = Field(None, description="QuantCDN organisations")
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent_streams: int | None = Field(None, gt=0)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


@dataclass
class RecentUse:
    """One caller's recent use: request times and (time, tokens) within the last minute."""

    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    streams: int = 0

    def trim(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.tokens.popleft()


@dataclass
class Caller:
    """An authenticated key: its name (never the key) and what it may do."""

    name: str
    entry: KeyEntry | None = None  # None: a plain key from the settings, unscoped, unlimited
    usage: RecentUse = field(default_factory=RecentUse)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def may_use_model(self, ids: set[str]) -> bool:
        allowed = self.entry.models if self.entry else None
        return allowed is None or bool(ids & set(allowed))

    def may_use_route(self, path: str) -> bool:
        allowed = self.entry.routes if self.entry else None
        return allowed is None or any(fnmatch.fnmatchcase(path, glob) for glob in allowed)

    def may_use_organization(self, organization: str) -> bool:
        allowed = self.entry.organizations if self.entry else None
        return allowed is None or organization in allowed

    def admit_request(self, route: str) -> None:
        """Counts a request against requests_per_minute, and refuses it while the key has
        used its tokens_per_minute."""
        entry = self.entry
        if entry is None:
            return
        now = time.monotonic()
        with self.lock:
            self.usage.trim(now)
            usage = self.usage
            if entry.requests_per_minute and len(usage.requests) >= entry.requests_per_minute:
                self._refuse(route, "requests_per_minute", usage.requests[0] + WINDOW_S - now,
                             f"{entry.requests_per_minute} requests per minute")
            used = sum(n for _, n in usage.tokens)
            if entry.tokens_per_minute and used >= entry.tokens_per_minute:
                self._refuse(route, "tokens_per_minute", usage.tokens[0][0] + WINDOW_S - now,
                             f"{entry.tokens_per_minute} tokens per minute ({used} used)")
            usage.requests.append(now)

    def charge_tokens(self, tokens: int) -> None:
        if self.entry is None or not self.entry.tokens_per_minute or tokens <= 0:
            return
        with self.lock:
            self.usage.tokens.append((time.monotonic(), tokens))

    @contextmanager
    def stream(self, route: str) -> Iterator[None]:
        """Held while a streamed response runs; refused beyond max_concurrent_streams."""
        limit = self.entry.max_concurrent_streams if self.entry else None
        with self.lock:
            if limit is not None and self.usage.streams >= limit:
                self._refuse(route, "max_concurrent_streams", 1.0,
                             f"{limit} concurrent streams")
            self.usage.streams += 1
        try:
            yield
        finally:
            with self.lock:
                self.usage.streams -= 1

    def _refuse(self, route: str, limit: str, retry_after: float, what: str) -> None:
        metrics.RATE_LIMITED.labels(self.name, route, limit).inc()
        raise RateLimitedError(f"API key {self.name!r} is limited to {what} (setting {limit} "
                               "in the keys file); retry later.",
                               retry_after=max(1.0, retry_after))


# The caller of the request being served (None: the server runs without keys).
current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "current_caller", default=None)


class AccessPolicy:
    """Every accepted key: plain ones (unscoped) and the keys file's hashed, scoped ones."""

    def __init__(self, plain_keys: list[str], keys_file: Path | None):
        self._plain = [Caller(name=f"key-{i + 1}") for i in range(len(plain_keys))]
        self._plain_keys = [key.encode() for key in plain_keys]
        entries = self._read(keys_file).keys if keys_file is not None else []
        self._hashed = [Caller(name=entry.name, entry=entry) for entry in entries]
        # (salt, stored hash) of each hashed key, split once.
        self._hashes = [(entry.hash.split("$")[1], entry.hash.encode()) for entry in entries]

    @staticmethod
    def _read(path: Path) -> KeysFile:
        try:
            return KeysFile.model_validate(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise KeyFileError(f"keys file {path}: {exc}") from exc

    @property
    def enabled(self) -> bool:
        return bool(self._plain or self._hashed)

    def __len__(self) -> int:
        return len(self._plain) + len(self._hashed)

    def authenticate(self, presented: str | None) -> Caller | None:
        """The caller a key belongs to, or None; every key is compared (`matching_index`)."""
        if presented is None:
            return None
        given = presented.encode()
        plain = matching_index((given, key) for key in self._plain_keys)
        hashed = matching_index((hash_key(presented, salt).encode(), stored)
                                for salt, stored in self._hashes)
        if plain is not None:
            return self._plain[plain]
        return self._hashed[hashed] if hashed is not None else None
