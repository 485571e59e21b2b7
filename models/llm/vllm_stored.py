"""Stored responses (OpenAI's Responses API) as vLLM's serving layer keeps
them: retrieving, streaming again, cancelling and deleting one, and the
background tasks that generate them, where vLLM's own handling falls short
(a failed task's response left ``queued``, a reader waiting past its task's
end, a cancel refused as "a synchronous response" whatever the response, a
follow-up on a response still generating prompted without its answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.errors import InvalidRequestError, ModelNotSupportedError
from models.llm import vllm_compat, vllm_errors, vllm_streams
from models.llm.stored import deleted_body, not_cancellable, not_streamable

if TYPE_CHECKING:
    from gateway.protocol.engine import EngineRequest
    from models.llm.tally import GenerationTally

# The tally of each background generation still running (``counted``).
_TALLIES: dict[Any, GenerationTally] = {}


async def answer(
    serving: vllm_compat.Serving, name: str, request: EngineRequest, tally: GenerationTally
) -> bytes | AsyncIterator[bytes]:
    """A stored response (``GET /v1/responses/{id}``; with ``stream``, a
    background response's events from ``starting_after`` on), or one
    cancelled, or deleted."""
    responses = serving.responses
    if responses is None:
        raise ModelNotSupportedError(f"The model `{name}` does not serve the Responses API.", param="model")
    body = request.body
    response_id = str(body["response_id"])
    if request.endpoint == "responses_delete":
        await delete_response(serving, response_id)
        return deleted_body(response_id)
    if request.endpoint == "responses_cancel" and (cancelled := check_cancellable(serving, response_id)) is not None:
        return vllm_compat.body_json(cancelled, request.endpoint)
    try:
        if request.endpoint == "responses_cancel":
            stop(background_task(serving, response_id))
            result = await responses.cancel_responses(response_id)
        else:
            result = await responses.retrieve_responses(
                response_id, body.get("starting_after"), bool(body.get("stream"))
            )
    except Exception as exc:  # noqa: BLE001 - vLLM's refusals, as it reports them
        raise vllm_errors.map_exception(exc, "response_id") from None
    if isinstance(result, serving.error_response):
        raise vllm_errors.map_error(result.model_dump(), "response_id")
    if hasattr(result, "model_dump_json"):
        return vllm_compat.body_json(result, request.endpoint)
    # vLLM's own reader would answer 200 and an error event for a response
    # with no events kept, and wait past the task's end for one with them.
    if not has_events(serving, response_id):
        raise not_streamable()
    events = background_events(serving, response_id, body.get("starting_after"))
    return vllm_streams.events(events, tally, after=body.get("starting_after"))


def background_task(serving: vllm_compat.Serving, request_id: str) -> Any:
    """The task vLLM generates a background response in (None if it runs none)."""
    return serving.responses.background_tasks.get(request_id)


def counted(task: Any, tally: GenerationTally) -> None:
    """``task``, a background generation, counts its tokens in ``tally``:
    when it is stopped (``stop``) before its end, what its engine request
    has used so far is counted first."""
    _TALLIES[task] = tally
    task.add_done_callback(lambda done: _TALLIES.pop(done, None))  # (the tally holds its task: no weak map)


def stop(task: Any) -> None:
    """Cancels a background generation still running. A whole answer's
    engine request reports its tokens only at its end, and the engine
    forgets it once stopped: what it used so far is counted first, in the
    same turn as the cancel, so no output can be counted twice."""
    if task is None or task.done():
        return
    tally = _TALLIES.pop(task, None)
    if tally is not None:
        tally.count_unseen()
    task.cancel()


def has_events(serving: vllm_compat.Serving, request_id: str) -> bool:
    """Whether a background response's events can be read yet."""
    return request_id in serving.responses.event_store


# A background response that is still being generated (vLLM's statuses).
_UNFINISHED = ("queued", "in_progress")


def mark_failure(serving: vllm_compat.Serving, response_id: str, task: Any) -> None:
    """Has the stored response say ``failed`` once ``task`` (its background
    generation) ends in an exception, or ends without having stored its
    answer (a stream vLLM ended with its own error event): vLLM marks only an error it returns,
    and a response refused by the engine (raised) stayed ``queued`` for good,
    polled for ever by a client waiting for it to finish. Its ``error`` says
    why, as OpenAI's does (vLLM's response object has no such field)."""

    def ended(done: Any) -> None:
        if done.cancelled():
            return
        stored = serving.responses.response_store.get(response_id)
        if stored is None or stored.status not in _UNFINISHED:
            return
        if done.exception() is not None:
            failure = vllm_errors.map_exception(done.exception())
        else:  # ended without storing its answer: its stream ended on vLLM's own error event
            failure = _last_error(serving, response_id)
        stored.status = "failed"
        stored.error = vllm_errors.response_error(failure)

    task.add_done_callback(ended)


def in_progress_soon(serving: vllm_compat.Serving, response_id: str, task: Any) -> None:
    """Has a background response's stored copy say ``in_progress`` from the
    next turn of the loop on, its first answer (``queued``, as OpenAI's
    says) written by then: vLLM's said ``queued`` until its end, where
    OpenAI's says ``in_progress`` while it generates."""

    def begun() -> None:
        stored = serving.responses.response_store.get(response_id)
        if stored is not None and stored.status == "queued" and not task.done():
            stored.status = "in_progress"

    asyncio.get_running_loop().call_soon(begun)


def _last_error(serving: vllm_compat.Serving, response_id: str) -> errors.GatewayError:
    """Why a background stream ended without its answer: its last event, an
    ``error`` one (vLLM's, for a generation that failed), says so."""
    kept = serving.responses.event_store.get(response_id)
    last = kept[0][-1] if kept and kept[0] else None
    message = getattr(last, "message", None) if getattr(last, "type", None) == "error" else None
    return errors.InternalServerError(message or "The model failed while generating the response.")


def check_cancellable(serving: vllm_compat.Serving, response_id: str) -> Any:
    """A background response cancelled already (cancelling is idempotent, as
    OpenAI's is: the response is answered again), else None for one that
    may be cancelled; raises InvalidRequestError for a stored response that
    has ended otherwise or was answered at once, saying which: vLLM calls
    every such one "a synchronous response". An unknown one is left to vLLM's 404."""
    stored = serving.responses.response_store.get(response_id)
    if stored is None or stored.status in _UNFINISHED:
        return None
    if stored.background and stored.status == "cancelled":
        return stored
    raise not_cancellable(str(stored.status), bool(stored.background))


def check_previous(serving: vllm_compat.Serving, previous_id: Any) -> None:
    """Refuses a follow-up (``previous_response_id``) on a background response
    still being generated: vLLM keeps that response's conversation from its
    start, without the answer, and prompted the follow-up without it."""
    stored = serving.responses.response_store.get(previous_id) if isinstance(previous_id, str) else None
    if stored is not None and stored.status in _UNFINISHED:
        raise InvalidRequestError(
            f"Previous response with id '{previous_id}' is still {stored.status}: "
            "it can be continued once it has completed.",
            param="previous_response_id",
        )


async def background_events(
    serving: vllm_compat.Serving, response_id: str, starting_after: int | None = None
) -> AsyncIterator[Any]:
    """A background response's events after ``starting_after``, as vLLM's own
    reader yields them, but ending when its task has ended: vLLM's waits for
    a ``response.completed`` that a failed or cancelled task never sends.
    Raises the task's exception after its last event when it failed (its
    stored error, when it had failed before this read began)."""
    responses = serving.responses
    events, new_event = responses.event_store[response_id]
    task = responses.background_tasks.get(response_id)  # None: it has ended
    index = 0 if starting_after is None else starting_after + 1
    while True:
        new_event.clear()
        while index < len(events):
            event = events[index]
            index += 1
            yield event
            if event.type == "response.completed":
                return
        if task is None or task.done():
            if task is not None and not task.cancelled() and task.exception() is not None:
                raise task.exception()
            if (failure := stored_failure(serving, response_id)) is not None:
                raise failure  # (its task, ended before this read began, is gone)
            return
        await new_event.wait()


def stored_failure(serving: vllm_compat.Serving, response_id: str) -> errors.GatewayError | None:
    """The error a failed response's events end with when read again, as
    they did live: the ``error`` kept on it (``mark_failure``); None when it
    did not fail."""
    stored = serving.responses.response_store.get(response_id)
    if stored is None or stored.status != "failed":
        return None
    error = getattr(stored, "error", None)
    said = error if isinstance(error, dict) else {"code": getattr(error, "code", None),
                                                  "message": getattr(error, "message", None)}
    code = said.get("code") or "server_error"
    message = said.get("message") or "The response failed."
    if code == "server_error":
        return errors.InternalServerError(message, code=code)
    return InvalidRequestError(message, code=code)


async def delete_response(serving: vllm_compat.Serving, response_id: str) -> None:
    """Deletes a stored response: its generation first, when it is a
    background one still running (vLLM's task would store it again, and
    assumes it is kept when it fails), then everything kept of it. Raises
    ResponseNotFoundError (404) when the engine keeps none: one still being
    answered at once is stored only when done, as retrieving finds it."""
    responses = serving.responses
    if responses.response_store.get(response_id) is None:
        raise errors.ResponseNotFoundError.for_id(response_id, "response_id")
    task = responses.background_tasks.get(response_id)
    if task is not None and not task.done():
        stop(task)
        await asyncio.gather(task, return_exceptions=True)
    forget_response(serving, response_id)


def forget_response(serving: vllm_compat.Serving, response_id: str) -> None:
    """Drops everything kept of a response; a background one still
    generating (dropped past the bound: no one can reach it) is stopped."""
    responses = serving.responses
    if responses is not None:
        stop(responses.background_tasks.get(response_id))
        for store in (responses.response_store, responses.msg_store, responses.event_store):
            store.pop(response_id, None)
