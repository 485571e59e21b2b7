"""What vLLM's serving layer streams, as the gateway sends and counts it:
its engine outputs counted into a request's tally (``count``), its SSE
strings and Responses and Messages events as bytes in the gateway's shapes
(``frames``, ``events``, ``named_events``), and a background response's
events read to the end of its task (``background_events``)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from gateway import sse
from gateway.errors import ENGINE_DIED, GatewayError, ServiceUnavailableError
from models.llm import vllm_errors

if TYPE_CHECKING:
    from models.llm.core_placement import CorePlacer
    from models.llm.tally import GenerationTally

# The tally of the request being handed to vLLM's serving layer: its calls to
# the engine's ``generate`` happen while it is set (``models.llm.vllm_engine``).
TALLY: ContextVar[GenerationTally | None] = ContextVar("tally", default=None)

_ERROR_PREFIX = b'data: {"error"'


async def count(
    outputs: AsyncIterator[Any],
    tally: GenerationTally,
    delta: bool,
    placer: CorePlacer | None = None,
    used: Callable[[], tuple[int, int] | None] | None = None,
) -> AsyncIterator[Any]:
    """Passes vLLM's ``RequestOutput``s through, adding their tokens and timings to ``tally``.

    Token times come from vLLM's request stats (engine-core timestamps) when
    it keeps them, else from arrival here, each sequence (choice) timed on
    its own. A final-only output spreads each sequence's tokens evenly
    between the first and the last token's times. ``placer``,
    when given, counts the request as generating from the first read on
    until the outputs end or are closed, and learns its tokens as they pass.
    ``used``, for outputs that are not deltas, tells what the engine has used
    for the request so far, until its first output: the tally asks it when
    the request is stopped before then (``GenerationTally.count_unseen``).
    """
    cumulative: dict[int, int] = {}  # per sequence, for outputs that repeat earlier tokens
    # Per sequence: each of n choices is a request of its own in the engine,
    # its tokens timed apart from its siblings' (as vLLM's own ITL times them).
    last_ts: dict[int, float] = {}
    first = True
    if placer is not None:
        placer.started()
    if used is not None and not delta:
        tally.unseen.add(used)
    try:
        async for output in outputs:
            if first:
                tally.unseen.discard(used)  # type: ignore[arg-type]
                tally.prompt_tokens += len(output.prompt_token_ids or ())
                tally.cached_tokens += int(getattr(output, "num_cached_tokens", None) or 0)
                first = False
            new = 0
            for seq in output.outputs:
                n = len(seq.token_ids)
                if not delta:
                    n, cumulative[seq.index] = n - cumulative.get(seq.index, 0), n
                if n > 0:
                    last_ts[seq.index] = _time_tokens(tally, output.metrics, n, last_ts.get(seq.index))
                new += n
            if new > 0:
                # Counted as they pass, not when this generator ends: one left
                # at a ``yield`` (its reader stopped) ends only once collected.
                tally.completion_tokens += new
                if placer is not None:
                    placer.produced(new)
            yield output
    finally:
        tally.unseen.discard(used)  # type: ignore[arg-type]
        if placer is not None:
            placer.ended()
        if hasattr(outputs, "aclose"):
            await outputs.aclose()  # aborts the engine request if we stopped early


def _time_tokens(
    tally: GenerationTally, stats: Any, new: int, last_ts: float | None
) -> float:
    """Records the timings of one sequence's ``new`` tokens (its first ones
    where ``last_ts`` is None: the request's first token, if no sibling's came
    first); returns the latest token's (monotonic) time."""
    now = time.monotonic()
    latest = float(stats.last_token_ts if stats is not None and stats.last_token_ts else now)
    if last_ts is not None:
        tally.gaps((latest - last_ts) / new, new)
        return latest
    first_at, first_ts = time.time(), now
    if stats is not None and stats.first_token_ts:
        first_at = stats.arrival_time + stats.first_token_latency
        first_ts = stats.first_token_ts
    tally.first_token(first_at)
    tally.gaps((latest - first_ts) / max(new - 1, 1), new - 1)
    return latest


# The events vLLM sends before it asks the engine for anything.
_PREAMBLE = frozenset({"response.created", "response.in_progress"})


_INCOMPLETE = "response.incomplete"
# The event's ``type`` in its JSON, after the response (which may hold the
# same bytes: a client's ``metadata`` or schema).
_COMPLETED_TYPE, _INCOMPLETE_TYPE = b'"type":"response.completed"', b'"type":"response.incomplete"'


async def events(
    stream: AsyncIterator[Any], tally: GenerationTally, hold: bool = False, after: int | None = None
) -> AsyncIterator[bytes]:
    """vLLM's Responses API events as OpenAI sends them (``event:`` and
    ``data:`` lines, no ``[DONE]``; a response cut short ends with
    ``response.incomplete``, where vLLM sends ``response.completed``). A
    failure after the first event ends the stream with an ``error`` event
    numbered after the last one (or after ``after``, where the stream is a
    stored response's events past that number, and none came). With ``hold``
    the first events (``_PREAMBLE``) wait for the next, and a failure before
    it is raised (GatewayError): the engine refused the request before
    generating, which the client gets as an HTTP error, as from OpenAI.

    vLLM asks its engine for tokens only once the stream is read: the tally
    is set here, in the context of the task that reads it (its own, per
    stream), not only while the stream was being made."""
    TALLY.set(tally)
    sequence = -1 if after is None else after  # (a stored response's events read again past ``after``)
    held: list[bytes] | None = [] if hold else None
    try:
        async for event in stream:
            sequence = getattr(event, "sequence_number", sequence)
            if event.type == "error":  # vLLM's own error event
                tally.failed(getattr(event, "code", None), 500)
            data = event.model_dump_json(indent=None, by_alias=True).encode()
            kind = event.type
            if kind == "response.completed" and getattr(event.response, "status", None) == "incomplete":
                # vLLM ends every stream so; OpenAI ends a cut-short one (``max_output_tokens``) so.
                at = data.rfind(_COMPLETED_TYPE)  # the event's own ``type``, its last field
                kind, data = _INCOMPLETE, data[:at] + _INCOMPLETE_TYPE + data[at + len(_COMPLETED_TYPE) :]
            frame = b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
            if held is not None:
                if event.type in _PREAMBLE:
                    held.append(frame)
                    continue
                frame, held = b"".join(held) + frame, None
            yield frame
    except Exception as exc:  # noqa: BLE001 - vLLM's failures mid-stream, as it reports them
        error = exc if isinstance(exc, GatewayError) else vllm_errors.map_exception(exc, "input")
        if held is not None:
            raise error from None  # refused before generating: an HTTP error, before the stream
        tally.failed(error.code, error.status_code)
        yield sse.responses_error_event(error.to_dict(), sequence + 1)
    finally:
        if hasattr(stream, "aclose"):
            await stream.aclose()  # vLLM's generator, when left early: its engine request ends now
    if held:
        yield b"".join(held)


async def named_events(
    stream: AsyncIterator[str | GatewayError], tally: GenerationTally, dropped: Callable[[str], bool] | None = None
) -> AsyncIterator[bytes]:
    """vLLM's Anthropic Messages events (``event:`` and ``data:`` lines, ready
    made, its own ``error`` event included, which ``tally`` records), as bytes,
    less those ``dropped`` says (when given).

    A GatewayError among them (``messages_converter``) is the stream's
    failure: Anthropic's ``error`` event, or, before any event, raised (the
    client gets it as an HTTP error, as from Anthropic)."""
    sent = False
    try:
        async for item in stream:
            if isinstance(item, GatewayError):
                if not sent:
                    raise item
                tally.failed(item.code, item.status_code)
                yield sse.event("error", item.to_anthropic())
                continue
            if item.startswith("event: error\n"):
                kind = str(json.loads(item.split("data: ", 1)[1]).get("error", {}).get("type", "api_error"))
                tally.failed(kind, 400 if kind == "invalid_request_error" else 500)
            if dropped is not None and dropped(item):
                continue
            sent = True
            yield item.encode()
    finally:
        if hasattr(stream, "aclose"):
            await stream.aclose()  # vLLM's conversion, when left early


Converter = Callable[[AsyncGenerator[str, None]], AsyncGenerator[str, None]]


def messages_converter(
    convert: Converter, dead: Callable[[], bool], first: Callable[[str], str] | None = None
) -> Callable[..., AsyncIterator[Any]]:
    """vLLM's conversion of a chat stream into Messages events, keeping a
    failure's own error. vLLM's converter reads the chat stream's error frame
    as a chunk, fails on it and sends pydantic's text about its own types as
    an ``internal_error`` (not a type Anthropic has). Here the chat stream
    ends at its error frame; after the events converted until then comes the
    error itself, as GatewayError (one that comes as the engine dies says
    so: 503, retry shortly), for ``named_events`` to send. ``first``, when
    given, rewrites the first event (``message_start``) and no other."""

    def converted(generator: AsyncGenerator[str, None]) -> AsyncIterator[Any]:
        failure: list[GatewayError] = []

        async def until_error() -> AsyncGenerator[str, None]:
            try:
                async for text in generator:
                    if text.startswith(_ERROR_PREFIX.decode()):
                        failure.append(_frame_error(text, dead))
                        return
                    yield text
            finally:
                await generator.aclose()

        async def events() -> AsyncIterator[Any]:
            chunks = until_error()
            stream = convert(chunks)
            rewrite = first
            try:
                async for event in stream:
                    if rewrite is not None:
                        event, rewrite = rewrite(event), None
                    yield event
            finally:
                await stream.aclose()
                await chunks.aclose()
            if failure:
                yield failure[0]

        return events()

    return converted


def count_beams(serving: Any) -> None:
    """Makes ``serving``'s beam search count its answer into the tally of the
    request being served. vLLM makes the search's generator while the request
    is served but runs it as it is read: a stream is read once the tally is no
    longer the context's, so its beams' engine requests went uncounted (and a
    key's token limit uncharged). The finished output counts instead, as the
    answer's usage does: its prompt once and each beam's tokens."""
    search = getattr(serving, "beam_search", None)
    if search is None:
        return

    def counted(*args: Any, **kwargs: Any) -> Any:
        tally = TALLY.get()
        searched = search(*args, **kwargs)
        return searched if tally is None else _beams_counted(searched, tally)

    serving.beam_search = counted


async def _beams_counted(searched: AsyncGenerator[Any, None], tally: GenerationTally) -> AsyncIterator[Any]:
    try:
        async for output in searched:
            if output.finished:
                tally.first_token()
                # Set, not added: a stream searches one prompt (vLLM refuses
                # streamed searches of completions, the only several-prompt
                # kind), and a whole answer's count is its usage, set after.
                tally.prompt_tokens = len(output.prompt_token_ids or ())
                tally.completion_tokens = sum(len(seq.token_ids) for seq in output.outputs)
                tally.cached_tokens = 0  # (the search's steps hit the cache, not the answer's prompt)
            yield output
    finally:
        await searched.aclose()


async def frames(
    stream: AsyncGenerator[str, None], dead: Callable[[], bool] = lambda: False, tally: GenerationTally | None = None
) -> AsyncIterator[bytes]:
    """vLLM's SSE strings as bytes, its error frames put in the gateway's shape
    (and recorded in ``tally``); one that comes as the engine dies (``dead``)
    says so: 503, retry shortly.

    Raises the error, as GatewayError, when it is the first frame: the engine
    refused the request before generating (top_logprobs past the engine's
    most, a schema or regex that makes no grammar). vLLM's own server then
    answers 200 and an error frame; the gateway answers as OpenAI does, an
    HTTP error before the stream starts (which a route's fallback also sees)."""
    first = True
    try:
        async for text in stream:
            frame = text.encode()
            if frame.startswith(_ERROR_PREFIX):
                error = _frame_error(text, dead)
                if first:
                    raise error
                if tally is not None:
                    tally.failed(error.code, error.status_code)
                yield sse.frame(error.to_dict())
                continue
            first = False
            yield frame
    finally:
        await stream.aclose()  # vLLM's generator, when left early


def _frame_error(text: str, dead: Callable[[], bool]) -> GatewayError:
    """The error of vLLM's error frame ``text`` (``data: {"error": ...}``);
    one that comes as the engine dies (``dead``) says so: 503, retry shortly."""
    envelope = json.loads(text[len("data: ") :])
    return ServiceUnavailableError(ENGINE_DIED) if dead() else vllm_errors.map_error(envelope)
