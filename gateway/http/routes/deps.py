"""FastAPI dependencies shared by the routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from gateway.http.state import GatewayState


async def gateway_state(request: Request) -> GatewayState:
    """The state the ingress replica bound to its app."""
    return request.app.state.gateway  # type: ignore[no-any-return]
