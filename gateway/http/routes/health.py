"""GET /health (liveness) and GET /ready (every deployment healthy); HEAD too,
which load balancers' and uptime checkers' probes often send. ``vllm serve``'s
own probes answer too: ``/ping`` (GET and POST, SageMaker's) as ``/health``,
and ``/version``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from gateway import __version__
from gateway.http.readiness import all_healthy
from gateway.http.routes.deps import gateway_state
from gateway.http.state import GatewayState

router = APIRouter()


@router.get("/health")
@router.head("/health", include_in_schema=False)
@router.get("/ping")
@router.post("/ping")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/version")
async def version() -> dict[str, str]:
    """The gateway's version (``vllm serve`` answers its own here)."""
    return {"version": __version__}


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(state: GatewayState = Depends(gateway_state)) -> JSONResponse:
    deployments = await state.deployment_statuses()
    healthy = all_healthy(deployments.values())
    return JSONResponse(
        {"status": "ready" if healthy else "not_ready", "deployments": deployments},
        status_code=200 if healthy else 503,
    )
