"""GET /v1/models and GET /v1/models/{id}"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from gateway.errors import MethodNotAllowedError, ModelNotFoundError
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


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request, state: GatewayState = Depends(gateway_state)) -> Any:
    """The model or alias ``model_id`` (which may hold slashes, as Hugging
    Face ids do). A trailing slash is redirected (307) without it, as every
    other route's is: ``/v1/models/`` is the list, not a model named ``""``."""
    if model_id.endswith("/") or not model_id:
        return RedirectResponse(request.url.replace(path=request.url.path.rstrip("/")), status_code=307)
    await state.refresh_model_info()
    for card in state.model_cards(api_key(request)):
        if card.id == model_id:
            return card
    if model_id.endswith(":predict"):
        # A GET to the predict route: 405, as a wrong method is answered anywhere else.
        error = MethodNotAllowedError("Method GET is not allowed here.")
        error.extra_headers["allow"] = "POST"
        raise error
    raise ModelNotFoundError.for_model(model_id)
