"""Stored responses (Responses API): which model's replica holds one, and
the query of a ``GET /v1/responses/{id}``."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from gateway.errors import InvalidRequestError, ServiceUnavailableError
from gateway.http.serving import LLMClient, ServedModel


async def holding(models: list[ServedModel], replica: str) -> ServedModel | None:
    """Which of ``models`` (LLMs) has the replica ``replica``: first among
    the replicas this ingress knows, then asking Serve."""
    clients = [(model, model.client) for model in models if isinstance(model.client, LLMClient)]
    for model, client in clients:
        if client.relay.knows(replica):
            return model
    for model, client in clients:
        try:
            if await client.relay.holds(replica):
                return model
        except ServiceUnavailableError:
            continue  # no replica of it runs: none of them stores it
    return None


def retrieve_query(request: Request) -> dict[str, Any]:
    """``stream`` and ``starting_after`` of a ``GET /v1/responses/{id}``, checked."""
    query: dict[str, Any] = {}
    stream = request.query_params.get("stream")
    if stream is not None:
        if stream.lower() not in ("true", "false"):
            raise InvalidRequestError("`stream` must be `true` or `false`.", param="stream")
        query["stream"] = stream.lower() == "true"
    after = request.query_params.get("starting_after")
    if after is not None:
        if not after.isdigit():
            raise InvalidRequestError("`starting_after` must be a whole number.", param="starting_after")
        query["starting_after"] = int(after)
    return query
