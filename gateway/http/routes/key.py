"""GET /v1/key: what the caller's key may do and what is left of its limits.

Reading it reserves nothing: it is how a client (or a test) learns its
remaining quota without spending any, and when its requests have all
settled (``usage.in_flight`` back to 0).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from gateway.errors import NotFoundError
from gateway.http.auth import api_key
from gateway.http.limits import limits_of
from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState
from gateway.protocol.keys import KeyInfo, KeyLimits, KeyUsage

router = APIRouter()


@router.get("/v1/key")
async def key_info(request: Request, state: GatewayState = Depends(gateway_state)) -> KeyInfo:
    key = api_key(request)
    if key is None:
        raise NotFoundError("This gateway has no API keys configured: requests need none.", code="keys_not_configured")
    usage = None
    if key.limited:
        counts, in_flight = await state.limiter.usage(key.id, limits_of(key))
        usage = KeyUsage(
            remaining_requests=counts.remaining_requests if key.rpm is not None else None,
            reset_requests_s=round(counts.reset_requests_s, 3) if key.rpm is not None else None,
            remaining_tokens=counts.remaining_tokens if key.tpm is not None else None,
            reset_tokens_s=round(counts.reset_tokens_s, 3) if key.tpm is not None else None,
            in_flight=in_flight,
        )
    return KeyInfo(
        id=key.id,
        models=list(key.models),
        expires_at=int(key.expires_at) if key.expires_at is not None else None,
        limits=KeyLimits(requests_per_minute=key.rpm, tokens_per_minute=key.tpm, max_concurrent=key.max_concurrent),
        usage=usage,
    )
