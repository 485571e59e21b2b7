"""The Open Inference Protocol's health and metadata for the models its
inference route (``POST /v2/models/{name}/infer``) serves: classifiers and
embedding models, by name or by alias.

A model is looked up as the inference route looks it up: one the caller's
key may not use is answered as one that does not exist (404
``model_not_found``); an LLM, which the route does not serve, 404
``model_not_supported``. Readiness comes from the Serve statuses ``/ready``
reads (shared with it, so probes of both cost the controller one question).

Metadata describes what the inference route takes and answers for the
model's kind, from what the ingress knows: a classifier's feature count, its
classes and an embedding model's width are known only to its replicas, so
those dimensions are -1 (any size), as the protocol writes a variable one.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import gateway
from gateway.deploy import deployment_name
from gateway.errors import ModelNotFoundError
from gateway.http.endpoints import ENDPOINTS
from gateway.http.readiness import all_healthy
from gateway.protocol.open_inference import ModelMetadata, ServerMetadata, TensorMetadata

if TYPE_CHECKING:
    from gateway.auth.keys import ApiKey
    from gateway.config import ModelConfig
    from gateway.http.state import GatewayState

SERVER_NAME = "llm-gateway"
# The inference route reads the one input tensor whatever its name; this is
# the name clients that build requests from the metadata send.
INPUT = "input-0"
# What the inference route takes and answers, by model kind. A classifier
# without ``predict_proba`` answers one ``predict`` tensor instead; labels are
# BYTES for named classes (INT64 for numbered ones, as each answer says).
_TENSORS: dict[str, tuple[list[TensorMetadata], list[TensorMetadata]]] = {
    "classifier": (
        [TensorMetadata(name=INPUT, datatype="FP64", shape=[-1, -1])],
        [
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP64", shape=[-1, -1]),
        ],
    ),
    "embedding": (
        [TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        [TensorMetadata(name="embedding", datatype="FP32", shape=[-1, -1])],
    ),
}


@dataclass(frozen=True, slots=True)
class InferenceModel:
    """A name the inference route serves: ``members`` are the models it may
    route to (itself, or an alias's variants: all of one kind)."""

    name: str
    members: tuple[ModelConfig, ...]

    @property
    def kind(self) -> str:
        return self.members[0].kind

    @property
    def platform(self) -> str:
        """The engine that runs it (``sklearn``, ``sentence-transformers``)."""
        return self.members[0].engine


@cache
def server_metadata() -> ServerMetadata:
    """The server's name and installed version; no protocol extensions."""
    try:
        version = importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = gateway.__version__
    return ServerMetadata(name=SERVER_NAME, version=version, extensions=[])


def inference_model(state: GatewayState, name: str, key: ApiKey | None) -> InferenceModel:
    """The model or alias ``name`` as ``key`` (None: an open gateway) may
    reach it through the inference route. Raises ModelNotFoundError for an
    unknown name or one the key may not use, ModelNotSupportedError for one
    the route does not serve."""
    config = state.config
    allowed = config is not None and (key is None or key.allows(name))
    members = state.routes.members(name) if allowed else []
    if config is None or not members:
        raise ModelNotFoundError.for_model(name)
    served = config.served()
    model = InferenceModel(name, tuple(served[member] for member in members))
    ENDPOINTS["infer"].check_kind(name, model.members[0].kind)
    return model


def model_metadata(model: InferenceModel) -> ModelMetadata:
    """What the inference route takes and answers for ``model``."""
    inputs, outputs = _TENSORS[model.kind]
    return ModelMetadata(name=model.name, platform=model.platform, inputs=inputs, outputs=outputs)


async def model_ready(state: GatewayState, model: InferenceModel) -> bool:
    """Whether every deployment ``model`` may route to is healthy: a request
    sent to an alias may go to any of its variants."""
    statuses = await state.deployment_statuses()
    return all_healthy(statuses.get(deployment_name(member), "NOT_STARTED") for member in model.members)
