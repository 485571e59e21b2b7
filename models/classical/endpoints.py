"""Each classical endpoint's request checking and answer rendering.

``parse`` turns one request into a :class:`Job` (raising
``gateway.errors.InvalidRequestError`` for a bad one); ``render`` turns the
job's predictions into the response body.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidRequestError
from gateway.protocol.embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    InputError,
)
from gateway.protocol.engine import EngineRequest
from gateway.protocol.predict import InferRequest, InferResponse, InferTensor, PredictRequest
from models.classical.predictor import Predictor

NUMERIC = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
# The values each numeric datatype holds: (least, most, whole numbers only).
_RANGES: dict[str, tuple[float, float, bool]] = {
    **{f"INT{bits}": (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, True) for bits in (8, 16, 32, 64)},
    **{f"UINT{bits}": (0, 2**bits - 1, True) for bits in (8, 16, 32, 64)},
    "FP16": (-65504.0, 65504.0, False),
    "FP32": (-3.4028234663852886e38, 3.4028234663852886e38, False),
    "FP64": (-sys.float_info.max, sys.float_info.max, False),
}


@dataclass
class Job:
    """One request's checked inputs and what its answer needs."""

    request: EngineRequest
    inputs: Any
    render: Callable[[Job, list[Any]], bytes]
    options: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    param: str = "inputs"  # the field the inputs came in (``instances``, ``inputs``, ``input``)


def parse(request: EngineRequest, predictor: Predictor, cap: int) -> Job:
    """Checks ``request`` against its endpoint's schema and the model's inputs."""
    if request.endpoint == "predict":
        field, instances = _validate(PredictRequest, request.body).sent()
        _check_cap(len(instances), cap, field)
        inputs = predictor.inputs(instances, field)
        return Job(request, inputs, _render_predict, prompt_tokens=_tokens(predictor, inputs), param=field)
    if request.endpoint == "embedding":
        return _parse_embedding(request, predictor, cap)
    if request.endpoint == "infer":
        return _parse_infer(request, predictor, cap)
    raise InvalidRequestError(f"{request.model} does not serve {request.endpoint} requests")


def _validate(schema: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequestError.from_validation(exc) from None


def _check_cap(count: int, cap: int, param: str) -> None:
    if count > cap:
        raise InvalidRequestError(
            f"'{param}' holds {count} entries; this model accepts at most {cap} per request.",
            param=param,
        )


class UnrepresentableAnswer(ValueError):
    """A prediction JSON cannot carry (NaN or an infinity): the request's
    answer fails, not silently turned into ``null`` or a non-JSON token."""


def _json(payload: BaseModel | dict[str, Any]) -> bytes:
    if isinstance(payload, BaseModel):
        return payload.model_dump_json(exclude_none=True).encode()
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise UnrepresentableAnswer("the model answered a number JSON cannot carry") from None


def _finite(matrix: np.ndarray) -> np.ndarray:
    """``matrix``, whose every value is a number (an embedding in half
    precision may overflow): pydantic would write NaN as ``null``, and
    base64 would carry it to the client as a vector."""
    if not np.isfinite(matrix).all():
        raise UnrepresentableAnswer("the model answered a number JSON cannot carry")
    return matrix


def _plain(prediction: Any) -> Any:
    return prediction.tolist() if isinstance(prediction, np.ndarray) else prediction


def _render_predict(job: Job, predictions: list[Any]) -> bytes:
    return _json({"predictions": [_plain(p) for p in predictions]})


# --- OpenAI embeddings ---------------------------------------------------------


def _parse_embedding(request: EngineRequest, predictor: Predictor, cap: int) -> Job:
    embedding = _validate(EmbeddingRequest, request.body)
    given = embedding.input  # counted before any is read: a string, or one list of token ids, is one input
    _check_cap(1 if isinstance(given, str) or isinstance(given[0], int) else len(given), cap, "input")
    try:
        texts = embedding.texts()
    except InputError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    dimensions = getattr(predictor, "dimensions", None)
    if embedding.dimensions is not None and embedding.dimensions != dimensions:
        raise InvalidRequestError(
            f"This model makes {dimensions}-dimensional embeddings and cannot shorten "
            f"them: leave out 'dimensions' or set it to {dimensions}.",
            param="dimensions",
        )
    inputs = predictor.inputs(texts, "input", lone=isinstance(embedding.input, str))
    return Job(
        request,
        inputs,
        _render_embedding,
        {"format": embedding.encoding_format},
        prompt_tokens=sum(inputs[1]),
        param="input",
    )


def _render_embedding(job: Job, vectors: list[Any]) -> bytes:
    base64_out = job.options["format"] == "base64"
    rows = [_finite(np.asarray(v, dtype="<f4")) for v in vectors]
    data = [
        Embedding(index=index, embedding=base64.b64encode(row.tobytes()).decode() if base64_out else row.tolist())
        for index, row in enumerate(rows)
    ]
    tokens = job.prompt_tokens
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return _json(EmbeddingResponse(data=data, model=job.request.model, usage=usage))


# --- Open Inference Protocol V2 ------------------------------------------------


def _parse_infer(request: EngineRequest, predictor: Predictor, cap: int) -> Job:
    infer = _validate(InferRequest, request.body)
    tensor = infer.inputs[0]
    param = "inputs[0]"
    _check_kind(tensor, predictor.kind, param)
    # The shape is checked before anything is built from it: a client's
    # [2**63, 0] with no data must not make the replica build its rows.
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidRequestError(f"{param}: shape {tensor.shape} has a negative dimension", param=param)
    if tensor.shape[0] == 0:
        raise InvalidRequestError(f"{param}: the tensor holds no instances", param=param)
    _check_cap(tensor.shape[0], cap, param)
    features = getattr(predictor, "n_features", None)
    if features is not None and tensor.shape[1] != features:  # (known before its data is read)
        raise InvalidRequestError(
            f"{param}: shape {tensor.shape} has {tensor.shape[1]} features per instance; "
            f"this model takes {features}",
            param=param,
        )
    data = _flat(tensor, param)
    _check_values(tensor.datatype, data, param)
    if predictor.kind == "embedding":
        instances: list[Any] = data
    else:
        width = tensor.shape[1]
        instances = [data[i * width : (i + 1) * width] for i in range(tensor.shape[0])]
    inputs = predictor.inputs(instances, param)
    wanted = _wanted_outputs(infer, predictor)
    options = {"id": infer.id, "kind": predictor.kind, "outputs": wanted}
    return Job(request, inputs, _render_infer, options, prompt_tokens=_tokens(predictor, inputs))


def _check_kind(tensor: InferTensor, kind: str, param: str) -> None:
    """The datatype and rank ``kind``'s models take: texts [N], numbers [N, features]."""
    if kind == "embedding":
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
            raise InvalidRequestError(f"{param}: this model takes texts: datatype BYTES with shape [N]", param=param)
    elif tensor.datatype not in NUMERIC or len(tensor.shape) != 2:
        raise InvalidRequestError(
            f"{param}: this model takes numbers: a numeric datatype with shape [N, features]", param=param
        )


def _check_values(datatype: str, data: list[Any], param: str) -> None:
    """Each number is one its datatype holds (a client's dtype mistake is
    refused, not read as float64): whole numbers in range for INT and UINT,
    within FP16's or FP32's range. Other values are checked as instances."""
    bounds = _RANGES.get(datatype)
    if bounds is None:
        return
    least, most, whole = bounds
    for at, value in enumerate(data):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (whole and isinstance(value, float) and not value.is_integer()) or not least <= value <= most:
            kind = "whole numbers" if whole else "numbers"
            raise InvalidRequestError(
                f"{param}: data[{at}] is {value}, which {datatype} cannot hold ({kind} from {least:g} to {most:g})",
                param=param,
            )


def _flat(tensor: InferTensor, param: str) -> list[Any]:
    """The tensor's data, row-major and flat, as many values as its shape holds."""
    size = tensor.shape[0] * (tensor.shape[1] if len(tensor.shape) > 1 else 1)
    data = tensor.data
    if len(tensor.shape) > 1 and data and all(isinstance(row, list) for row in data):
        # Nested rows are accepted too, each as long as the shape's row (a tensor of rank 1
        # has none: `[["a"], ["b"]]` is of shape [2, 1], which the rank check refuses).
        width = size // tensor.shape[0]
        if len(data) != tensor.shape[0] or any(len(row) != width for row in data):
            raise InvalidRequestError(
                f"{param}: nested 'data' must be {tensor.shape[0]} rows of {width} values for shape {tensor.shape}",
                param=param,
            )
        data = [value for row in data for value in row]
    if size != len(data):
        raise InvalidRequestError(
            f"{param}: shape {tensor.shape} holds {size} values but 'data' has {len(data)}", param=param
        )
    return data


def _tokens(predictor: Predictor, inputs: Any) -> int:
    """The tokens an embedding model's inputs hold (counted as /v1/embeddings
    counts them, whichever endpoint they came by); none for other models."""
    return sum(inputs[1]) if predictor.kind == "embedding" else 0


def _wanted_outputs(infer: InferRequest, predictor: Predictor) -> list[str] | None:
    """The output tensors ``infer`` asks for by name, in its order (None: all);
    a name the model does not answer with is refused, naming it."""
    if infer.outputs is None:
        return None
    names = [output.name for output in infer.outputs]
    for index, name in enumerate(names):
        if name not in predictor.outputs:
            offered = ", ".join(f"'{known}'" for known in predictor.outputs)
            raise InvalidRequestError(
                f"outputs[{index}].name: this model has no output '{name}'; it answers with {offered}",
                param=f"outputs[{index}].name",
            )
    return names


def _render_infer(job: Job, predictions: list[Any]) -> bytes:
    rows = len(predictions)
    if job.options["kind"] == "embedding":
        matrix = _finite(np.asarray(predictions, dtype=np.float32))
        outputs = [_tensor("embedding", "FP32", matrix)]
    elif predictions and isinstance(predictions[0], dict):
        labels = [p["label"] for p in predictions]
        probabilities = np.asarray([list(p["probabilities"].values()) for p in predictions])
        outputs = [
            InferTensor(name="label", shape=[rows], datatype=_datatype(labels), data=labels),
            _tensor("probabilities", "FP64", probabilities),
        ]
    elif predictions and np.ndim(predictions[0]) > 0:  # several values per instance
        matrix = np.asarray(predictions)
        values = matrix.reshape(-1).tolist()
        outputs = [InferTensor(name="predict", shape=list(matrix.shape), datatype=_datatype(values), data=values)]
    else:
        outputs = [InferTensor(name="predict", shape=[rows], datatype=_datatype(predictions), data=predictions)]
    for output in outputs if job.options["kind"] != "embedding" else ():  # (an embedding is checked above)
        if output.datatype.startswith("FP") and not all(math.isfinite(v) for v in output.data):
            raise UnrepresentableAnswer("the model answered a number JSON cannot carry")
    wanted = job.options.get("outputs")
    if wanted is not None:
        by_name = {output.name: output for output in outputs}
        outputs = [by_name[name] for name in wanted]
    return _json(InferResponse(model_name=job.request.model, id=job.options["id"], outputs=outputs))


def _tensor(name: str, datatype: str, matrix: np.ndarray) -> InferTensor:
    return InferTensor(
        name=name, shape=list(matrix.shape), datatype=datatype, data=matrix.reshape(-1).tolist()  # type: ignore[arg-type]
    )


def _datatype(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "FP64"
    return "BYTES"
