"""POST /v1/models/{model}:predict (KServe V1) and POST /v2/models/{model}/infer (OIP V2)"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.post("/v1/models/{model:path}:predict")
async def predict(
    model: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.dispatch("predict", request, model=model)


@router.post("/v2/models/{model:path}/infer")
async def infer(
    model: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.dispatch("infer", request, model=model)
