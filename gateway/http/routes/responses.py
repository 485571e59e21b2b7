"""OpenAI's Responses API, served by the model's own vLLM serving layer:
``POST /v1/responses``, ``POST /v1/responses/input_tokens`` (what a request's
input counts), and the stored responses' ``GET /v1/responses/{id}``
``GET /v1/responses/{id}/input_items``, ``POST /v1/responses/{id}/cancel`` and
``DELETE /v1/responses/{id}``, answered by the replica that keeps them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request, state: GatewayState = Depends(gateway_state)) -> Response:
    return await state.dispatcher.dispatch("responses", request)


@router.post("/v1/responses/input_tokens")
async def count_input_tokens(request: Request, state: GatewayState = Depends(gateway_state)) -> Response:
    return await state.dispatcher.dispatch("responses_input_tokens", request)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(
    response_id: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.stored("responses_retrieve", request, response_id)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(
    response_id: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.stored("responses_cancel", request, response_id)


@router.delete("/v1/responses/{response_id}")
async def delete_response(
    response_id: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.stored("responses_delete", request, response_id)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> Response:
    return await state.dispatcher.stored("responses_input_items", request, response_id)
