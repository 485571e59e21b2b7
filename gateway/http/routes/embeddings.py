"""POST /v1/embeddings"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(
    request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.dispatch("embedding", request)
