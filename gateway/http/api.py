"""Builds the FastAPI app an ingress replica serves."""

from __future__ import annotations

from fastapi import FastAPI

from gateway.http.handlers import install_handlers
from gateway.http.request_id import RequestIdMiddleware
from gateway.http.routes import chat, completions, embeddings, health, models, predict
from gateway.http.state import GatewayState


def build_api(state: GatewayState) -> FastAPI:
    app = FastAPI(
        title="llm-gateway",
        summary="OpenAI-compatible gateway",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = state
    for module in (chat, completions, embeddings, predict, models, health):
        app.include_router(module.router)
    install_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app
