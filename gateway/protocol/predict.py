"""Classical-model prediction shapes.

KServe V1 / TF-Serving: ``POST /v1/models/{name}:predict`` with
``{"instances": [...]}`` answered by ``{"predictions": [...]}``. Open Inference
Protocol V2: ``POST /v2/models/{name}/infer`` with typed tensors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    """KServe V1 request; unknown fields are refused, not dropped."""

    model_config = ConfigDict(extra="forbid")

    instances: list[Any] = Field(min_length=1, description="One entry per prediction.")


class PredictResponse(BaseModel):
    predictions: list[Any]


Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]


class InferTensor(BaseModel):
    """One named tensor: row-major flat ``data`` with its ``shape``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(min_length=1)
    datatype: Datatype
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """Open Inference Protocol V2 request: one input tensor, rows are instances."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[InferTensor]
