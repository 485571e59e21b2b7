"""The replica's relay port beside its streams (``models.llm.relay``):
whole answers of non-streaming requests, token counts, and errors before
the first byte."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gateway.errors import GatewayError, InternalServerError, InvalidRequestError
from gateway.leaving import CallerLeft, unless_caller_leaves
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest, Reply
from models.llm.tally import GenerationTally

logger = logging.getLogger(__name__)

# Answers a non-streaming request, counting into the tally it is given;
# raises GatewayError as handle calls do.
Answerer = Callable[[EngineRequest, GenerationTally], Coroutine[Any, Any, Reply]]

# Counts a request's most tokens (``relay.COUNT``); raises GatewayError.
Counter = Callable[[EngineRequest], Awaitable[int]]

async def answer_whole(
    answer: Answerer,
    request: EngineRequest,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    keep: bool = False,
) -> bool:
    """A non-streaming request: the body, then ``END`` and the outcome; a connection
    that closes first cancels the work (and so aborts the engine request), and
    gets ``END`` and what was generated until then, if it still reads.
    Returns whether the connection may carry another request."""
    tally = GenerationTally(request.arrived)
    work = asyncio.create_task(answer(request, tally))
    hang_up = asyncio.create_task(reader.read(1))
    try:
        await asyncio.wait({work, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung_up = await stop_watching(hang_up)
        stopped = not work.done()
        if stopped:
            tally.count_unseen()  # (the engine reports a whole answer's tokens only at its end)
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if stopped:
        # However the work ended: vLLM's servers answer the cancel with an
        # error response of their own, which is not what the caller gets.
        writer.write(relay.END + relay.encode_outcome(tally.outcome()))
        await writer.drain()
        return False
    keep = keep and not hung_up
    try:
        reply = work.result()
    except GatewayError as error:
        await write_error(writer, error, keep)
        return keep
    except Exception:
        logger.exception("request %s: failed", request.request_id)
        await write_error(writer, InternalServerError("The model failed while serving the request."), keep)
        return keep
    if tally.continues is None:
        head = relay.response_head(200, "application/json", keep=keep)
        writer.write(head + reply.body + relay.END + relay.encode_outcome(reply.outcome))
        await writer.drain()
        return keep
    # Answered, generating on (a background response): the outcome once done,
    # then the connection closes.
    writer.write(relay.response_head(200, "application/json") + reply.body + relay.END)
    await writer.drain()
    await asyncio.gather(asyncio.shield(tally.continues), return_exceptions=True)
    writer.write(relay.encode_outcome(tally.outcome()))
    await writer.drain()
    return False


async def count(
    count: Counter | None,
    request: EngineRequest,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    keep: bool = False,
) -> bool:
    """Answers a count; whether the connection may carry another request
    (not where the ingress left first, its time up: the count is stopped)."""
    if count is None:
        await write_error(writer, InvalidRequestError("This replica does not count tokens.", status=404), keep)
        return keep
    try:
        # (The watch ends before the answer is written: the ingress's next request is never read here.)
        tokens = await unless_caller_leaves(count(request), reader.read(1))
    except CallerLeft:
        return False
    except GatewayError as error:
        await write_error(writer, error, keep)
        return keep
    except Exception:
        logger.exception("request %s: counting its tokens failed", request.request_id)
        await write_error(writer, InternalServerError("The model failed while serving the request."), keep)
        return keep
    body = json.dumps({"tokens": tokens}).encode()
    writer.write(relay.response_head(200, "application/json", len(body), keep) + body)
    await writer.drain()
    return keep


async def stop_watching(hang_up: asyncio.Task[bytes]) -> bool:
    """Stops waiting for the caller to close its side while its request runs
    (the connection's reader is free again once this returns); whether it had
    (or sent bytes, which it never does mid-request)."""
    hang_up.cancel()
    await asyncio.wait({hang_up})
    return not hang_up.cancelled()


async def write_error(writer: asyncio.StreamWriter, error: GatewayError, keep: bool = False) -> None:
    body = json.dumps(error.to_wire(), separators=(",", ":")).encode()
    writer.write(relay.response_head(error.status_code, "application/json", len(body), keep) + body)
    await writer.drain()
