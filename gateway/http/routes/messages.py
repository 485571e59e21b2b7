"""Anthropic's Messages API: ``POST /v1/messages`` (streaming and not) and
``POST /v1/messages/count_tokens``, served by the model's own vLLM serving
layer. Errors on these routes take Anthropic's envelope
(``gateway.http.handlers.anthropic_path``); keys may come as ``x-api-key``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.post("/v1/messages")
async def create_message(request: Request, state: GatewayState = Depends(gateway_state)) -> Response:
    return await state.dispatcher.dispatch("messages", request)


@router.post("/v1/messages/count_tokens")
async def count_message_tokens(request: Request, state: GatewayState = Depends(gateway_state)) -> Response:
    return await state.dispatcher.dispatch("messages_count", request)
