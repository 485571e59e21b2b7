"""vLLM's tokenizer routes, as ``vllm serve`` has them: ``POST /tokenize`` (a
prompt, or chat messages through the model's chat template, to token ids)
and ``POST /detokenize`` (token ids to text), answered by the model's own
vLLM serving layer. Behind the key check like every model route."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request, state: GatewayState = Depends(gateway_state)) -> Response:
    return await state.dispatcher.dispatch("tokenize", request)


@router.post("/detokenize")
async def detokenize(request: Request, state: GatewayState = Depends(gateway_state)) -> Response:
    return await state.dispatcher.dispatch("detokenize", request)
