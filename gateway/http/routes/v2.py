"""The Open Inference Protocol's required routes beside inference (which is
in ``predict``): ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2``, ``GET /v2/models/{model}`` and ``GET /v2/models/{model}/ready``.

The health routes are probes, open as ``/health`` and ``/ready`` are (or
behind an operations key, with theirs); the others want an API key, as
inference does. A probe that finds the gateway or a model not ready is
answered 503 with ``ready: false``: tritonclient, KServe's clients and
Kubernetes read readiness from the status alone.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gateway.errors import MethodNotAllowedError, ModelNotFoundError
from gateway.http import open_inference
from gateway.http.auth import api_key
from gateway.http.readiness import all_healthy
from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState
from gateway.protocol.open_inference import ModelMetadata, ModelReady, ServerLive, ServerMetadata, ServerReady

router = APIRouter()


@router.get("/v2/health/live")
@router.head("/v2/health/live", include_in_schema=False)
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get(
    "/v2/health/ready", response_model=ServerReady,
    responses={503: {"model": ServerReady, "description": "Not ready: `{\"ready\": false}`"}},
)
@router.head("/v2/health/ready", include_in_schema=False)
async def server_ready(state: GatewayState = Depends(gateway_state)) -> Any:
    """Ready as ``/ready`` is: the ingress and every model deployment healthy."""
    ready = all_healthy((await state.deployment_statuses()).values())
    return _ready(ServerReady(ready=ready))


@router.get("/v2")
async def server_metadata() -> ServerMetadata:
    return open_inference.server_metadata()


# Before the metadata route, whose ``{model:path}`` would take ``name/ready`` as a model name.
@router.get("/v2/models/{model:path}/ready", response_model=ModelReady)
async def model_ready(model: str, request: Request, state: GatewayState = Depends(gateway_state)) -> Any:
    served = open_inference.inference_model(state, model, api_key(request))
    return _ready(ModelReady(name=model, ready=await open_inference.model_ready(state, served)))


@router.get("/v2/models/{model:path}", response_model=ModelMetadata, response_model_exclude_none=True)
async def model_metadata(model: str, request: Request, state: GatewayState = Depends(gateway_state)) -> Any:
    try:
        served = open_inference.inference_model(state, model, api_key(request))
    except ModelNotFoundError:
        if model.endswith("/infer"):
            # A GET to the inference route: 405, as a wrong method is answered anywhere else.
            error = MethodNotAllowedError("Method GET is not allowed here.")
            error.extra_headers["allow"] = "POST"
            raise error from None
        raise
    return open_inference.model_metadata(served)


def _ready(answer: ServerReady | ModelReady) -> ServerReady | ModelReady | JSONResponse:
    return answer if answer.ready else JSONResponse(answer.model_dump(), status_code=503)
