"""Builds the FastAPI app an ingress replica serves."""

from __future__ import annotations

from fastapi import FastAPI

from gateway.http.auth import KeyGuard
from gateway.http.handlers import install_handlers
from gateway.http.model_routes import ModelRoutes
from gateway.http.observe import ObservabilityMiddleware, route_matcher
from gateway.http.openapi import describe
from gateway.http.routes import (
    chat,
    completions,
    embeddings,
    health,
    key,
    messages,
    metrics,
    models,
    predict,
    responses,
)
from gateway.http.state import GatewayState

# Scrapes are not requests to measure: each would show in the next.
UNMEASURED = frozenset({"/metrics"})


def build_api(state: GatewayState, server_echoes_id: bool = False) -> FastAPI:
    """The app; ``server_echoes_id`` when Serve echoes each request's
    ``x-request-id`` itself (see ``gateway.http.observe``)."""
    app = FastAPI(
        title="llm-gateway",
        summary="OpenAI-compatible gateway",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = state
    for module in (chat, completions, responses, messages, embeddings, predict, models, key, health, metrics):
        app.include_router(module.router)
    install_handlers(app)
    describe(app)
    # Innermost: model requests skip FastAPI's router once keys are checked.
    app.add_middleware(ModelRoutes, handlers=dict(app.exception_handlers))
    app.add_middleware(KeyGuard, keys=lambda: state.keys)  # inside: 401s are measured and logged
    app.add_middleware(
        ObservabilityMiddleware,
        metrics=state.metrics,
        access_log=state.access_log,
        route_of=route_matcher(app.router.routes, UNMEASURED),
        server_echoes_id=server_echoes_id,
    )
    return app
