"""Open Inference Protocol V2 health and metadata shapes (its inference
request and answer are in ``gateway.protocol.predict``).

``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/{name}`` and ``GET /v2/models/{name}/ready``, as the
protocol's REST specification names their fields.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from gateway.protocol.predict import Datatype


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    """One tensor a model takes or answers; -1 is a dimension of any size."""

    name: str
    datatype: Datatype
    shape: list[int]


class ModelMetadata(BaseModel):
    """A model as the inference route serves it (``versions`` left out: a
    version cannot be asked for)."""

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
