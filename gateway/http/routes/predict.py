"""POST /v1/models/{model}:predict (KServe V1) and POST /v2/models/{model}/infer (OIP V2)"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.errors import InvalidRequestError
from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.post("/v1/models/{model:path}:predict")
async def predict(
    model: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.dispatch("predict", request, model=model)


# The Open Inference Protocol's binary tensor extension marks its bodies so.
BINARY_HEADER = "inference-header-content-length"


@router.post("/v2/models/{model:path}/infer")
async def infer(
    model: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    if BINARY_HEADER in request.headers:
        # Said as such, where the body would be refused as JSON that does not parse.
        raise InvalidRequestError(
            "Binary tensor data (the binary tensor extension, `Inference-Header-Content-Length`) is not "
            "supported: send the tensors as JSON (tritonclient: `binary_data=False`).",
            param="inputs",
        )
    return await state.dispatcher.dispatch("infer", request, model=model)
