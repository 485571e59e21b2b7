"""GET /v1/models and GET /v1/models/{id}"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from gateway.errors import ModelNotFoundError
from gateway.http.auth import api_key
from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState
from gateway.protocol.models import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, state: GatewayState = Depends(gateway_state)) -> ModelList:
    """The models and aliases the caller's key may use (all on an open gateway)."""
    await state.refresh_model_info()
    return ModelList(data=state.model_cards(api_key(request)))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(
    model_id: str, request: Request, state: GatewayState = Depends(gateway_state)
) -> ModelCard:
    await state.refresh_model_info()
    for card in state.model_cards(api_key(request)):
        if card.id == model_id:
            return card
    raise ModelNotFoundError.for_model(model_id)
