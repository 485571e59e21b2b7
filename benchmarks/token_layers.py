"""What the gateway's own Python costs per streamed token in an LLM replica,
in one process: the layers a token passes there besides vLLM's (the token
count and timings, ``vllm_streams.count``; the error check on each frame,
``vllm_streams.frames``; the replica's pass-through; the chunk framing and
the write to the client's socket, ``ClientSocket``), against a bare loop
that writes the same frames as the same chunks to the same kind of socket.
Both run on uvloop, as Serve's replicas do, reading from a stand-in for
vLLM's SSE generator (one frame per engine output, each output a turn of
the loop as the engine's are) and writing to a socket pair whose other end
is read as fast as it comes. CPU time of the process per token, alternated.

    python -m benchmarks.token_layers --tokens 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import uvloop

from models.llm import vllm_streams
from models.llm.handoff import ClientSocket
from models.llm.tally import GenerationTally

FRAME = (
    'data: {"id":"chatcmpl-0","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    '[{"index":0,"delta":{"content":" word"},"logprobs":null,"finish_reason":null}]}\n\n'
)


def outputs(count: int) -> list[Any]:
    """Engine outputs as vLLM's ``RequestOutput`` carries them: one token each, with its timings."""
    now, wall = time.monotonic(), time.time()
    return [
        types.SimpleNamespace(
            outputs=[types.SimpleNamespace(token_ids=[i], index=0)],
            metrics=types.SimpleNamespace(
                last_token_ts=now + i * 0.001, first_token_ts=now, arrival_time=wall, first_token_latency=0.01
            ),
            prompt_token_ids=[1, 2, 3],
            num_cached_tokens=0,
        )
        for i in range(count)
    ]


async def engine(made: list[Any]) -> AsyncIterator[Any]:
    """Stands for vLLM's engine client: the outputs, each in a turn of the loop of its own."""
    for output in made:
        yield output
        await asyncio.sleep(0)


async def sse(stream: AsyncIterator[Any]) -> AsyncGenerator[str, None]:
    """Stands for vLLM's chat stream generator: one frame per output."""
    async for _ in stream:
        yield FRAME


async def _passed(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The replica's own pass-through of a stream's frames (``LLMServer._counted``)."""
    async for frame in frames:
        yield frame


async def _read_all(sock: socket.socket) -> int:
    """Reads ``sock`` to its end, as fast as bytes come; how many came."""
    loop, read = asyncio.get_running_loop(), 0
    while data := await loop.sock_recv(sock, 1 << 16):
        read += len(data)
    return read


def chunked_size(tokens: int) -> int:
    """The bytes ``tokens`` frames make as HTTP chunks."""
    data = len(FRAME.encode())
    return tokens * (len(b"%x\r\n" % data) + data + 2)


async def one(tokens: int, ours: bool) -> float:
    """Microseconds of CPU per token for one pass; raises unless every chunk arrived whole."""
    made = outputs(tokens)
    sending, receiving = socket.socketpair()
    try:
        sending.setblocking(False)
        receiving.setblocking(False)
        reader = asyncio.create_task(_read_all(receiving))
        started = time.process_time()
        await (_through_layers(sending, made) if ours else _bare(sending, made))
        spent = time.process_time() - started
        sending.close()
        if (read := await reader) != chunked_size(tokens):
            raise RuntimeError(f"{read} bytes arrived, not {chunked_size(tokens)}")
    finally:
        sending.close()
        receiving.close()
    return spent / tokens * 1e6


async def _through_layers(sending: socket.socket, made: list[Any]) -> None:
    out, tally = ClientSocket(sending), GenerationTally()
    async for frame in _passed(vllm_streams.frames(sse(vllm_streams.count(engine(made), tally, True)), tally=tally)):
        out.write(frame)
        if out.get_write_buffer_size() > 1 << 16:
            await out.drain()
    await out.drain()
    if tally.completion_tokens != len(made):
        raise RuntimeError(f"counted {tally.completion_tokens} tokens of {len(made)}")


async def _bare(sending: socket.socket, made: list[Any]) -> None:
    loop = asyncio.get_running_loop()
    async for text in sse(engine(made)):
        data = text.encode()
        await loop.sock_sendall(sending, b"%x\r\n%b\r\n" % (len(data), data))


def measure(tokens: int, rounds: int) -> dict[str, list[float]]:
    """Per-token CPU (µs) of the bare loop and of the gateway's layers, alternated."""
    figures: dict[str, list[float]] = {"bare": [], "gateway": []}
    for _ in range(rounds):
        for name in figures:
            figures[name].append(uvloop.run(one(tokens, name == "gateway")))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name, values in measure(args.tokens, args.rounds).items():
        print(f"{name:<8} " + ", ".join(f"{v:.1f}" for v in values) + " µs of CPU per token")


if __name__ == "__main__":
    main()
