"""POST /v1/responses: OpenAI's Responses API, served by the model's own vLLM serving layer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request, state: GatewayState = Depends(gateway_state)) -> Response:
    return await state.dispatcher.dispatch("responses", request)
