"""What the streaming load generator counts: tokens by the answer's usage,
quantiles interpolated, and a stream cut short failing the run."""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import pytest
from aiohttp import web

from benchmarks import stream_load


def frame(payload: object) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def delta(text: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}


async def sample(frames: list[bytes], max_tokens: int = 4) -> stream_load.Sample:
    """One stream of ``frames`` from a server on this loop, as the load generator reads it."""

    async def answer(request: web.Request) -> web.StreamResponse:
        asked = await request.json()
        assert asked["stream_options"] == {"include_usage": True}
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for data in frames:
            await response.write(data)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as client:
            return await stream_load.one_stream(client, f"http://127.0.0.1:{port}/v1/chat/completions", max_tokens, 0)
    finally:
        await runner.cleanup()


def test_tokens_are_the_answers_usage_when_a_message_carries_several() -> None:
    got = asyncio.run(sample([frame(delta("one two")), frame(delta("three four")), frame(USAGE), frame(b"[DONE]")]))

    assert got.tokens == 4
    assert len(got.gaps_s) == 1  # gaps are between the messages that arrived


@pytest.mark.parametrize(
    "frames",
    [
        [frame(delta("one")), frame(USAGE)],  # no [DONE]
        [frame(delta("one")), frame({**USAGE, "usage": {"completion_tokens": 1}}), frame(b"[DONE]")],  # short
        [frame(delta("one")), frame({"error": {"message": "engine died"}}), frame(b"[DONE]")],
    ],
    ids=["no-done", "cut-short", "error-frame"],
)
def test_a_stream_that_did_not_finish_fails_the_run(frames: list[bytes]) -> None:
    with pytest.raises(RuntimeError, match="stream"):
        asyncio.run(sample(frames))


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([float(i) for i in range(1, 101)], 0.99, 99.01),  # not the maximum, 100
        ([7.0], 0.99, 7.0),
    ],
)
def test_quantiles_interpolate_as_numpy_does(values: list[float], q: float, expected: float) -> None:
    assert stream_load.quantile(values, q) == pytest.approx(expected)


def test_no_values_have_no_quantile() -> None:
    assert math.isnan(stream_load.quantile([], 0.5))

