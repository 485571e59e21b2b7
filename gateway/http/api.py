"""Builds the FastAPI app an ingress replica serves."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from gateway.http.auth import KeyGuard
from gateway.http.handlers import install_handlers
from gateway.http.model_routes import ModelRoutes
from gateway.http.observe import ObservabilityMiddleware, route_matcher
from gateway.http.origin import OriginGuard
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
    tokenize,
    v2,
)
from gateway.http.state import GatewayState

# Scrapes are not requests to measure: each would show in the next.
UNMEASURED = frozenset({"/metrics"})

# Response headers a browser page may read: ids, the variant, limits, retries.
EXPOSED_HEADERS = (
    "x-request-id", "request-id", "x-gateway-variant", "x-gateway-overhead-ms",
    "retry-after", "retry-after-ms",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)


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
    for module in (
        chat, completions, responses, messages, tokenize, embeddings, predict, v2, models, key, health, metrics
    ):
        app.include_router(module.router)
    install_handlers(app)
    describe(app)
    # Innermost: model requests skip FastAPI's router once keys are checked.
    app.add_middleware(ModelRoutes, handlers=dict(app.exception_handlers))
    app.add_middleware(KeyGuard, keys=lambda: state.keys)  # inside: 401s are measured and logged
    cors = state.front_door.ingress.cors
    app.add_middleware(
        OriginGuard, origins=cors.allow_origins if cors is not None else [],
        hosts=state.front_door.ingress.allowed_hosts, keyless=lambda: not state.keys,
    )
    app.add_middleware(
        ObservabilityMiddleware,
        metrics=state.metrics,
        access_log=state.access_log,
        route_of=route_matcher(app.router.routes, UNMEASURED),
        server_echoes_id=server_echoes_id,
    )
    if cors is not None:
        # Outermost: a preflight (no API key) is answered before the key check, and
        # every answer, 401 and 429 included, carries the headers a page needs to read it.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_methods=cors.allow_methods,
            allow_headers=cors.allow_headers,
            allow_credentials=cors.allow_credentials,
            expose_headers=EXPOSED_HEADERS,
            max_age=cors.max_age_s,
        )
    return app
