"""API keys: secrets made once, kept only as hashes, checked per request.

A secret is ``sk-gw-`` and 43 characters of ``secrets.token_urlsafe`` (256
random bits), so a fast hash is safe to store: nothing can be guessed from it.
A request's key is found by hashing what it sent and looking the hash up,
which takes the same time whatever the secret.
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.config import KeyConfig
from gateway.errors import AuthenticationError

SECRET_PREFIX = "sk-gw-"

MISSING = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
INCORRECT = "Incorrect API key provided."
EXPIRED = "The API key provided has expired."


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the config stores for ``secret``."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One configured key, as requests are checked against it."""

    id: str
    models: tuple[str, ...]
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    expires_at: float | None = None  # epoch seconds

    @classmethod
    def of(cls, config: KeyConfig) -> ApiKey:
        return cls(
            id=config.id,
            models=tuple(config.models),
            rpm=config.rpm,
            tpm=config.tpm,
            max_concurrent=config.max_concurrent,
            expires_at=config.expires.timestamp() if config.expires is not None else None,
        )

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrent))

    def allows(self, model: str) -> bool:
        """Whether requests may name ``model`` (a model or an alias)."""
        return any(
            pattern == model or fnmatch.fnmatchcase(model, pattern) for pattern in self.models
        )


class KeyTable:
    """The keys an ingress replica accepts: API keys (none: the API is open)
    and operations keys (none: health, readiness and metrics are open)."""

    def __init__(self, keys: Iterable[KeyConfig] = (), clock: Callable[[], float] = time.time) -> None:
        keys = list(keys)
        self._by_hash = {k.hash: ApiKey.of(k) for k in keys if not k.ops}
        self._ops_by_hash = {k.hash: ApiKey.of(k) for k in keys if k.ops}
        self._clock = clock

    def __bool__(self) -> bool:
        return bool(self._by_hash)

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def guards_ops(self) -> bool:
        """Whether health, readiness and metrics need an operations key."""
        return bool(self._ops_by_hash)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The API key an ``Authorization`` header names; raises
        AuthenticationError (401 ``invalid_api_key``) when it is missing,
        unknown or expired (an operations key is unknown here)."""
        return self._find(self._by_hash, authorization)

    def authenticate_ops(self, authorization: str | None) -> ApiKey:
        """The operations key an ``Authorization`` header names (API keys are
        unknown here); raises as ``authenticate`` does."""
        return self._find(self._ops_by_hash, authorization)

    def _find(self, table: dict[str, ApiKey], authorization: str | None) -> ApiKey:
        scheme, _, secret = (authorization or "").strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthenticationError(MISSING)
        key = table.get(hash_secret(secret))
        if key is None:
            raise AuthenticationError(INCORRECT)
        if key.expires_at is not None and self._clock() >= key.expires_at:
            raise AuthenticationError(EXPIRED)
        return key
