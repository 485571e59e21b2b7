"""gateway/http/plan.py: where a request goes from its body alone; the tokenizer routes take
the one LLM served when they name none, as `vllm serve` does."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth.keys import ApiKey
from gateway.errors import InvalidRequestError
from gateway.http.endpoints import ENDPOINTS
from gateway.http.plan import plan
from gateway.http.serving import ServedModel, ServingTable
from gateway.routing.table import RouteTable


def table(**kinds: str) -> ServingTable:
    models = {name: ServedModel(name, kind, None) for name, kind in kinds.items()}  # type: ignore[arg-type]
    return ServingTable(RouteTable(list(kinds)), "x-session-id", models)


@pytest.mark.parametrize(("endpoint", "body"), [("tokenize", {"prompt": "hi"}), ("detokenize", {"tokens": [1]})])
def test_a_tokenizer_request_naming_no_model_goes_to_the_one_llm_served(endpoint: str, body: dict[str, Any]) -> None:
    # Scripts written against `vllm serve` send none: they were refused 400.
    served = table(chat="llm", iris="classifier")
    for given in (body, {**body, "model": None}):
        planned = plan(served, ENDPOINTS[endpoint], given, {}, None)  # type: ignore[index]
        assert (planned.name, planned.route.target) == ("chat", "chat")
    # Counted among what a key may use: a key of one model is as a gateway of one.
    two = table(a="llm", b="llm")
    assert plan(two, ENDPOINTS[endpoint], body, {}, ApiKey("k", ("b",))).name == "b"  # type: ignore[index]
    with pytest.raises(InvalidRequestError) as refused:  # which of several: the client must say
        plan(two, ENDPOINTS[endpoint], body, {}, None)  # type: ignore[index]
    assert refused.value.param == "model"


def test_other_endpoints_still_need_their_model() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        plan(table(chat="llm"), ENDPOINTS["chat"], {"messages": []}, {}, None)
    assert refused.value.param == "model"


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_safety_identifier_keeps_a_user_on_one_variant_where_user_is_not_sent(endpoint: str) -> None:
    # OpenAI's API asks for it in place of the deprecated `user`: without it, each request drew anew.
    from gateway.routing.table import Alias
    from gateway.routing.weighted import Variant

    models = {name: ServedModel(name, "llm", None) for name in ("a", "b")}  # type: ignore[arg-type]
    routes = RouteTable(models, {"r": Alias([Variant("a", 1), Variant("b", 1)])})
    served = ServingTable(routes, "x-session-id", models)
    spec = ENDPOINTS[endpoint]  # type: ignore[index]
    for user in (f"user-{n}" for n in range(20)):
        by_user = plan(served, spec, {"model": "r", "user": user}, {}, None).route.target
        by_id = {plan(served, spec, {"model": "r", "safety_identifier": user}, {}, None).route.target for _ in range(5)}
        by_header = plan(served, spec, {"model": "r"}, {"x-session-id": user}, None).route.target
        assert by_id == {by_user} == {by_header}
    # `user` first where both are sent (as before).
    users = [f"u{n}" for n in range(20)]
    target = {u: plan(served, spec, {"model": "r", "user": u}, {}, None).route.target for u in users}
    first, other = next((u, v) for u in target for v in target if target[u] != target[v])
    both = {"model": "r", "user": first, "safety_identifier": other}
    assert plan(served, spec, both, {}, None).route.target == target[first]
