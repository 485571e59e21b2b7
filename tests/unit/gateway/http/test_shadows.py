"""gateway/http/shadows.py: shadow copies never pile up on a slow or stopped shadow model."""

from __future__ import annotations

import logging

import pytest

from gateway import sse
from gateway.errors import InvalidRequestError
from gateway.http.serving import ClassicalClient, LLMClient, ServedModel
from gateway.http.shadows import Shadows
from gateway.protocol.engine import EngineRequest
from tests.unit.gateway.http.test_dispatch import FakeHandle, Restarting
from tests.unit.gateway.http.test_relay_connection import until


def copy(n: int) -> EngineRequest:
    return EngineRequest("chat", {"model": "s", "messages": []}, f"r{n}-shadow", "s")


async def test_copies_past_the_bound_are_not_sent_until_some_are_done() -> None:
    slow = FakeHandle(unary=b"{}", delay=30)  # a shadow model far slower than its primary
    model = ServedModel("s", "llm", LLMClient(slow, 1.0), timeout_s=0.5)
    shadows = Shadows(max_out=2)
    for n in range(4):
        shadows.send(model, copy(n))
    await until(lambda: len(slow.calls) == 2)
    assert len(shadows) == 2  # the other two were never sent
    # Each copy is bounded by its model's request_timeout_s: the engine's work is stopped.
    await until(lambda: len(shadows) == 0 and all(r.cancelled for r in slow.responses), timeout_s=5)
    slow.delay = 0
    shadows.send(model, copy(5))
    await until(lambda: len(slow.calls) == 3 and len(shadows) == 0)
    assert [c.request_id for c in slow.calls] == ["r0-shadow", "r1-shadow", "r5-shadow"]


async def test_a_shadows_failure_is_logged_on_one_line_whatever_its_client_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The shadow model's refusal repeats a key the client named, which holds a newline.
    said = "Unrecognized request argument supplied: x\nERROR forged"
    refused = FakeHandle(unary=InvalidRequestError(said, param="x"))
    model = ServedModel("s", "llm", LLMClient(refused, 1.0), timeout_s=5)
    shadows = Shadows(max_out=2)
    with caplog.at_level(logging.INFO, logger="gateway.http.shadows"):
        shadows.send(model, copy(1))
        await until(lambda: len(shadows) == 0 and bool(caplog.records))
    line = caplog.records[0].getMessage()
    assert "\n" not in line and "InvalidRequestError" in line and "ERROR forged" in line


@pytest.mark.parametrize("bound", ["capacity", "places"])
async def test_no_copy_goes_to_an_llm_this_ingress_keeps_half_busy(bound: str) -> None:
    # Its places are its own clients' (the shadow model also serves them by name, or in another alias).
    handle = FakeHandle(stream=[sse.frame({"n": 0}), 30.0])
    client = LLMClient(handle, 1.0)
    model = ServedModel("s", "llm", client, timeout_s=5)
    setattr(client.relay, bound, 2)  # (places alone: its queue unbounded, the default)
    held = await client.relay.open(EngineRequest("chat", {"stream": True}, "client", "s"))
    shadows = Shadows()
    shadows.send(model, copy(1))
    assert len(shadows) == 0
    held.close()
    shadows.send(model, copy(2))
    assert len(shadows) == 1
    await until(lambda: len(shadows) == 0)


@pytest.mark.parametrize("down", ["before", "during"])
async def test_a_copy_to_a_classical_model_without_a_running_replica_is_given_up(down: str) -> None:
    # Serve's router would hold it until a replica runs again (no request_timeout_s: for ever),
    # and MAX_OUT such copies would stop every route's shadowing on this ingress.
    handle = Restarting()
    handle.delay = 60
    model = ServedModel("s", "classifier", ClassicalClient(handle, "classifier", 0.2))
    if down == "before":
        handle.up.clear()
    shadows = Shadows()
    shadows.send(model, EngineRequest("predict", {"instances": [[1]]}, "r-shadow", "s"))
    if down == "during":
        await until(lambda: len(handle.calls) == 1)  # with Serve's router, which waits for a replica
        handle.up.clear()
    await until(lambda: len(shadows) == 0, timeout_s=3)
