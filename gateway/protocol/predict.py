"""Classical-model prediction shapes.

KServe V1 / TF-Serving: ``POST /v1/models/{name}:predict`` with
``{"instances": [...]}`` answered by ``{"predictions": [...]}``. Open Inference
Protocol V2: ``POST /v2/models/{name}/infer`` with typed tensors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from gateway.errors import InvalidRequestError


class PredictRequest(BaseModel):
    """KServe V1 request; unknown fields are refused, not dropped. KServe
    takes the instances as ``instances`` or as ``inputs`` (one of them)."""

    model_config = ConfigDict(extra="forbid")

    instances: list[Any] | None = Field(None, min_length=1, description="One entry per prediction.")
    inputs: list[Any] | None = Field(None, min_length=1, description="KServe's other name for `instances`.")

    def sent(self) -> tuple[str, list[Any]]:
        """The field the instances came in and the instances; InvalidRequestError
        for neither field or both."""
        if self.instances is not None and self.inputs is not None:
            raise InvalidRequestError(
                "Send the instances as 'instances' or as 'inputs', not both.", param="inputs"
            )
        if self.inputs is not None:
            return "inputs", self.inputs
        if self.instances is None:
            raise InvalidRequestError(
                "Missing required parameter: 'instances'.", param="instances", code="missing_required_parameter"
            )
        return "instances", self.instances


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
    shape: list[StrictInt] = Field(min_length=1)  # "each dimension must be an integer": not "1", 1.0 or true
    datatype: Datatype
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferRequestedOutput(BaseModel):
    """An output tensor the client asks for by name (``outputs``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """Open Inference Protocol V2 request: one input tensor, rows are instances;
    ``outputs`` names the output tensors to answer with (all when left out)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    outputs: list[InferRequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class InferErrorResponse(BaseModel):
    """The Open Inference Protocol's error: the message alone."""

    error: str


class InferResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[InferTensor]
