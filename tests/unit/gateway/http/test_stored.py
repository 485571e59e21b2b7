"""gateway/http/stored.py: the queries of a stored response's routes, checked at the ingress,
and the models whose stored responses a key may reach."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from fastapi import Request

from gateway.auth.keys import ApiKey
from gateway.errors import InvalidRequestError, ResponseNotFoundError, ServiceUnavailableError
from gateway.http.serving import LLMClient, ServedModel, ServingTable
from gateway.http.stored import allowed_llms, input_items_query, made_by, retrieve_query
from gateway.protocol.engine import EngineRequest, Outcome, Reply
from gateway.routing.table import Alias, RouteTable
from gateway.routing.weighted import Variant
from tests.unit.gateway.http.test_dispatch import FakeHandle


def request(query: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": query.encode(), "headers": []})


def test_input_items_query_defaults_as_openai_does() -> None:
    assert input_items_query(request("")) == {"limit": 20, "order": "desc"}
    assert input_items_query(request("after=msg_1&limit=100&order=asc&include[]=message.input_image.image_url")) == {
        "limit": 100, "order": "asc", "after": "msg_1"
    }


@pytest.mark.parametrize(
    "query, param",
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("limit=%C2%B2", "limit"),  # a Unicode digit int() cannot read: not a 500
        ("order=newest", "order"),
        ("include[]=everything", "include"),
        ("include=everything", "include"),
        ("before=msg_1", "before"),  # not silently ignored: the page would be another one
    ],
)
def test_a_bad_input_items_query_is_refused_naming_the_parameter(query: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        input_items_query(request(query))
    assert (caught.value.status_code, caught.value.param) == (400, param)


def test_retrieve_query_takes_stream_and_where_to_start() -> None:
    assert retrieve_query(request("")) == {}
    query = "stream=true&starting_after=3&include[]=message.output_text.logprobs"
    assert retrieve_query(request(query)) == {"stream": True, "starting_after": 3}
    # The SDK's own retrieve(..., stream=True, include_obfuscation=False): nothing to turn off here.
    assert retrieve_query(request("stream=true&include_obfuscation=false")) == {"stream": True}


@pytest.mark.parametrize(
    "query, param",
    [
        ("stream=maybe", "stream"),
        ("starting_after=-1", "starting_after"),
        ("starting_after=%C2%B2", "starting_after"),  # a Unicode digit int() cannot read: not a 500
        ("starting_after=" + "9" * 5000, "starting_after"),
        ("include_obfuscation=perhaps", "include_obfuscation"),
        ("include[]=bogus", "include"),  # refused by input items, not silently ignored here either
        ("include=bogus", "include"),
        ("after=3", "after"),
    ],
)
def test_a_bad_retrieve_query_is_refused_naming_the_parameter(query: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        retrieve_query(request(query))
    assert (caught.value.status_code, caught.value.param) == (400, param)


async def test_a_key_reaches_the_stored_responses_of_the_models_its_aliases_route_to() -> None:
    names = ["chat-a", "chat-b", "other", "embedder"]
    models = {
        name: ServedModel(name, "llm" if name != "embedder" else "embedding", LLMClient(FakeHandle(), 1.0))
        for name in names
    }
    aliases = {"chat": Alias([Variant("chat-a", 100), Variant("chat-b", 0)])}
    table = ServingTable(RouteTable(names, aliases, random.Random(1)), "x-session-id", models)

    def reached(api: ApiKey | None) -> list[str]:
        return [model.name for model in allowed_llms(table, api)]

    assert reached(ApiKey("k", ("chat",))) == ["chat-a", "chat-b"]  # a weight of 0 now may have made some
    assert reached(ApiKey("k", ("other",))) == ["other"]
    assert reached(ApiKey("k", ("chat*", "chat"))) == ["chat-a", "chat-b"]  # each once
    assert reached(None) == ["chat-a", "chat-b", "other"]


class StoringReplica:
    """The replicas of a base model and its adapters: a stored response says which made it."""

    def __init__(self, made: dict[str, str]) -> None:
        self.made = made
        self.asked: list[EngineRequest] = []

    def unary(self, call: EngineRequest, *_: object) -> asyncio.Future[Reply]:
        self.asked.append(call)
        answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if call.body["response_id"] in self.made:
            body = {"id": call.body["response_id"], "model": self.made[call.body["response_id"]]}
            answer.set_result(Reply(json.dumps(body).encode(), Outcome()))
        elif call.body["response_id"] == "resp_busy":
            answer.set_exception(ServiceUnavailableError("The model is restarting."))
        else:
            answer.set_exception(ResponseNotFoundError.for_id(call.body["response_id"], "response_id"))
        return answer


async def test_a_stored_response_is_given_to_the_variant_that_made_it_where_several_share_its_replica() -> None:
    replica = StoringReplica({"resp_a": "base-ft", "resp_b": "base"})
    base = ServedModel("base", "llm", replica, None)  # type: ignore[arg-type]
    adapter = ServedModel("base-ft", "llm", replica, None)  # type: ignore[arg-type]
    other = ServedModel("other", "llm", StoringReplica({}), None)  # type: ignore[arg-type]
    models = [base, adapter, other]
    assert await made_by(models, base, "resp_a", "r1", "req", "key") is adapter
    assert await made_by(models, base, "resp_b", "r1", "req", "key") is base
    assert replica.asked[0].replica == "r1" and replica.asked[0].owner == "key"
    assert await made_by(models, base, "resp_gone", "r1", "req", "key") is base  # its own 404 follows
    assert await made_by(models, other, "resp_a", "r2", "req", "key") is other  # alone on its replicas: not asked
    assert len(replica.asked) == 3
    # Unanswered, it is not taken for the base model's: an adapter's
    # conversation must not go on without its adapter.
    with pytest.raises(ServiceUnavailableError):
        await made_by(models, base, "resp_busy", "r1", "req", "key")
