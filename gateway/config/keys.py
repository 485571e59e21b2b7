"""API keys: their hashes (never the secrets), the models each may use, its limits."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from gateway.config.base import StrictConfig

KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


class KeyConfig(StrictConfig):
    """An API key: its hash (never the secret), the models it may use and its limits.

    ``llm-gateway keys new`` makes a secret and prints this entry for it.
    """

    id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The key's name: safe to log; labels its metrics and access log lines.",
    )
    hash: str = Field(
        pattern=KEY_HASH_PATTERN, description="`sha256:` and the hex SHA-256 of the secret."
    )
    models: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["*"],
        description="Model and alias names (glob patterns allowed) the key may use. "
        "An alias lets the key reach its variants through it.",
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute (none: unlimited).")
    tpm: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute, prompt and completion together (none: unlimited).",
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests of this key in flight at once (none: unlimited)."
    )
    expires: datetime | None = Field(
        None, description="When the key stops working (ISO 8601 with a time zone)."
    )
    ops: bool = Field(
        False,
        description="An operations key: it reaches /health, /ready and /metrics (which then "
        "need one) and nothing under /v1 or /v2.",
    )

    @field_validator("expires")
    @classmethod
    def _aware(cls, expires: datetime | None) -> datetime | None:
        if expires is not None and expires.tzinfo is None:
            raise ValueError("give a time zone (e.g. 2027-01-31T00:00:00Z)")
        return expires

    @model_validator(mode="after")
    def _ops_key_has_no_models_or_limits(self) -> KeyConfig:
        if self.ops:
            for name in ("rpm", "tpm", "max_concurrent"):
                if getattr(self, name) is not None:
                    raise ValueError(f"ops key {self.id!r}: {name} applies to API keys only")
            if self.models != ["*"]:
                raise ValueError(f"ops key {self.id!r}: models applies to API keys only")
        return self

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrent))
