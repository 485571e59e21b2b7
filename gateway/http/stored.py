"""Stored responses (Responses API): which model's replica holds one, and
the queries of ``GET /v1/responses/{id}`` and its ``/input_items``."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from gateway.auth.keys import ApiKey
from gateway.errors import GatewayError, InvalidRequestError, ResponseNotFoundError, ServiceUnavailableError
from gateway.http.serving import LLMClient, ServedModel, ServingTable
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest
from gateway.routing.table import Route


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


async def made_by(
    models: list[ServedModel], model: ServedModel, response_id: str, replica: str, request_id: str, owner: str
) -> ServedModel:
    """Which of ``models`` made the response ``response_id``, which
    ``model``'s replica ``replica`` stores: ``model``, unless others of them
    are served by the same replicas (a base model and its LoRA adapters),
    when the replica says which one it was (else ``model``: the request
    then gets the replica's own answer). The replica's 5xx is raised: a
    follow-up must not go on as a model that did not make the response."""
    sharing = {other.name: other for other in models if other.client is model.client}
    if len(sharing) < 2:
        return model
    asked = EngineRequest("responses_retrieve", {"response_id": response_id}, request_id, model.name, replica, owner)
    try:
        made = json.loads((await model.client.unary(asked)).body).get("model")
    except GatewayError as error:
        if error.status_code >= 500:
            raise
        return model
    except (ValueError, AttributeError):
        return model
    return sharing.get(made, model) if isinstance(made, str) else model


async def holder(
    table: ServingTable, name: str, response_id: str, param: str, api: ApiKey | None, request_id: str
) -> tuple[Route, str]:
    """The route to the variant of ``name`` whose replica stores
    ``response_id``, and that replica's id; 404 when none does (the id was
    not made here, or its replica has stopped); 400 naming ``model`` when
    another model's replica keeps it for the caller's key: a conversation
    is continued by the replica that keeps it."""
    replica = relay.response_replica(response_id)
    if replica is None:
        raise ResponseNotFoundError.for_id(response_id, param)
    members = table.llms(table.routes.members(name))
    model = await holding(members, replica)
    # Said only to the key that made it: to any other the id does not exist.
    owner = api.id if api is not None else ""
    if model is not None:
        # The conversation stays on the variant that made it, also where its
        # replica serves others of the alias (LoRA adapters of one base).
        model = await made_by(members, model, response_id, replica, request_id, owner)
        return table.routes.pinned(name, model.name), replica
    elsewhere = await holding(allowed_llms(table, api), replica)
    if elsewhere is None:
        raise ResponseNotFoundError.for_id(response_id, param)
    asked = EngineRequest("responses_retrieve", {"response_id": response_id}, request_id, elsewhere.name, replica, owner)
    try:
        await elsewhere.client.unary(asked)
    except ResponseNotFoundError:
        raise ResponseNotFoundError.for_id(response_id, param) from None
    raise InvalidRequestError(
        f"The response '{response_id}' was made by the model `{elsewhere.name}`, whose replica keeps its "
        f"conversation and answers its follow-ups: send `model` `{elsewhere.name}` (or an alias routing "
        f"to it), or the earlier turns in `input` without `{param}`.",
        param="model",
    )


def allowed_llms(table: ServingTable, api: ApiKey | None) -> list[ServedModel]:
    """The LLMs ``api`` may use, by name or through an alias it may use (all
    of them on an open gateway): the models whose stored responses it may reach."""
    if api is None:
        return table.llms(table.models)
    names = [name for name in table.models if api.allows(name)]
    for alias in table.routes.aliases():
        if api.allows(alias):
            names += table.routes.members(alias)
    return table.llms(dict.fromkeys(names))


def retrieve_query(request: Request) -> dict[str, Any]:
    """``stream`` and ``starting_after`` of a ``GET /v1/responses/{id}``,
    checked; ``include`` values must be OpenAI's. ``include_obfuscation``
    (the SDK's own) is checked and has nothing to turn off: events carry no
    obfuscation padding here. Nothing else is taken."""
    _check_known(request, {"stream", "starting_after", "include", "include[]", "include_obfuscation"})
    _check_include(request)
    query: dict[str, Any] = {}
    for name in ("stream", "include_obfuscation"):
        flag = request.query_params.get(name)
        if flag is not None and flag.lower() not in ("true", "false"):
            raise InvalidRequestError(f"`{name}` must be `true` or `false`.", param=name)
    stream = request.query_params.get("stream")
    if stream is not None:
        query["stream"] = stream.lower() == "true"
    after = request.query_params.get("starting_after")
    if after is not None:
        if not _whole_number(after):
            raise InvalidRequestError("`starting_after` must be a whole number.", param="starting_after")
        query["starting_after"] = int(after)
    return query


def _whole_number(text: str) -> bool:
    """Decimal digits that ``int`` reads (not ``²`` nor other Unicode digits), at most 18 of them."""
    return text.isascii() and text.isdigit() and len(text) <= 18


# What `include` may ask of input items (OpenAI's values). The items come as
# they were sent, image URLs included, so none changes the answer.
INCLUDABLE = frozenset(
    {
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "reasoning.encrypted_content",
        "message.output_text.logprobs",
    }
)
MAX_ITEMS = 100


def input_items_query(request: Request) -> dict[str, Any]:
    """``after``, ``limit`` (1 to 100, 20 when left out) and ``order`` (``asc``
    or ``desc``, the default) of a ``GET /v1/responses/{id}/input_items``,
    checked; ``include`` values must be OpenAI's. Nothing else is taken."""
    params = request.query_params
    _check_known(request, {"after", "limit", "order", "include", "include[]"})
    _check_include(request)
    query: dict[str, Any] = {"limit": 20, "order": "desc"}
    limit = params.get("limit")
    if limit is not None:
        if not _whole_number(limit) or not 1 <= int(limit) <= MAX_ITEMS:
            raise InvalidRequestError(
                f"Invalid 'limit': expected a whole number from 1 to {MAX_ITEMS}, got '{limit}'.", param="limit"
            )
        query["limit"] = int(limit)
    order = params.get("order")
    if order is not None:
        if order not in ("asc", "desc"):
            raise InvalidRequestError(f"Invalid 'order': expected 'asc' or 'desc', got '{order}'.", param="order")
        query["order"] = order
    if "after" in params:
        query["after"] = params["after"]
    return query


def _check_known(request: Request, known: set[str]) -> None:
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidRequestError(f"Unrecognized query parameter: `{unknown[0]}`.", param=unknown[0])


def _check_include(request: Request) -> None:
    """The stored items and responses come as they were made, so no
    ``include`` value changes the answer; one OpenAI does not know is refused."""
    params = request.query_params
    for value in [*params.getlist("include"), *params.getlist("include[]")]:
        if value not in INCLUDABLE:
            raise InvalidRequestError(
                f"Invalid 'include': '{value}' is not one of {', '.join(sorted(INCLUDABLE))}.", param="include"
            )
