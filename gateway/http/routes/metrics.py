"""GET /metrics: Prometheus text for the whole gateway (every ingress replica, every engine)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState
from gateway.metrics.hub import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(state: GatewayState = Depends(gateway_state)) -> Response:
    return Response(await state.metrics_page(), media_type=CONTENT_TYPE)
