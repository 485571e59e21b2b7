"""What every part of the configuration shares: the error start-up fails
with, the strict model every section is, and the name of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        # Slashes only between segments: GET /v1/models/{name} must find it
        # (a trailing or doubled one is redirected or merged by HTTP routing).
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9._:-]+)*$",
        description="Name clients use in the request's `model` field (`/` only between segments).",
    ),
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and the reason."""


class StrictConfig(BaseModel):
    """A config section: unknown fields are refused, and it never changes once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def user_path(text: str, field: str) -> Path:
    """``text`` as a path, ``~`` and ``~user`` expanded; ConfigError naming
    ``field`` for a user with no home directory here."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ConfigError(f"{field}: {text!r} names a user with no home directory on this machine") from None
