"""Classical-model prediction shapes.

KServe V1 / TF-Serving: ``POST /v1/models/{name}:predict`` with
``{"instances": [...]}`` answered by ``{"predictions": [...]}``. Open Inference
Protocol V2: ``POST /v2/models/{name}/infer`` with typed tensors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

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


# Parameters of Triton's extensions whose requests plain JSON tensors cannot
# answer: an input sent as binary (``binary_data_size``: its data follows the
# JSON, which the route refuses by its header), top-k classes asked for
# (``classification``). Refused, naming the extension, not dropped unseen.
# ``binary_data`` and ``binary_data_output`` only ask for binary outputs, a
# preference (tritonclient sends them by default, and reads JSON ``data`` where
# an output has no ``binary_data_size``): answered as JSON, as before.
_EXTENSIONS = {
    "binary_data_size": ("the binary tensor extension", "send tensors as JSON (tritonclient: `binary_data=False`)"),
    "classification": ("the classification extension (top-k classes)", "ask for 'probabilities' and rank them"),
}


def _no_extensions(parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Refuses the parameters of an extension this server does not serve."""
    for name, (extension, instead) in _EXTENSIONS.items():
        if parameters is not None and name in parameters:
            raise ValueError(f"'{name}' asks for {extension}, which is not supported: {instead}")
    return parameters


class InferTensor(BaseModel):
    """One named tensor: row-major flat ``data`` with its ``shape``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[StrictInt] = Field(min_length=1)  # "each dimension must be an integer": not "1", 1.0 or true
    datatype: Datatype
    data: list[Any]
    parameters: dict[str, Any] | None = None

    _parameters = field_validator("parameters")(_no_extensions)


class InferRequestedOutput(BaseModel):
    """An output tensor the client asks for by name (``outputs``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None

    _parameters = field_validator("parameters")(_no_extensions)


class InferRequest(BaseModel):
    """Open Inference Protocol V2 request: one input tensor, rows are instances;
    ``outputs`` names the output tensors to answer with (all when left out),
    each once."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    outputs: list[InferRequestedOutput] | None = Field(None, min_length=1)
    parameters: dict[str, Any] | None = None

    _parameters = field_validator("parameters")(_no_extensions)

    @field_validator("outputs")
    @classmethod
    def _each_once(cls, outputs: list[InferRequestedOutput] | None) -> list[InferRequestedOutput] | None:
        names = [output.name for output in outputs or ()]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ValueError(f"outputs[{index}]: '{name}' is asked for twice")
        return outputs


class InferErrorResponse(BaseModel):
    """The Open Inference Protocol's error: the message alone."""

    error: str


class InferResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[InferTensor]
