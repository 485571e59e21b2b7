"""The stored responses of one LLM replica (OpenAI's Responses API): whose
each is, and how many are kept.

The engine keeps the responses themselves (vLLM's serving layer, in its own
memory); this keeps, per response, the API key that made it and its
request's ``input`` (for its input items), oldest first, and tells the
engine to drop one once more than ``size`` have been stored, or their input
holds more than ``INPUT_CHARS`` characters (images' data URLs): the oldest,
unless a key keeps more than half the room, then that key's own oldest (so
one key's flood cannot push out the others' conversations, and a key gone
quiet does not keep its responses for ever). A
response counts once its generation has ended and the engine stored it: a
request the engine refuses, or one left before it was stored, never drops
another's response (nor takes a place). A request that
names a stored response (``previous_response_id``, also when counting input
tokens; retrieve, cancel, delete, input items) is answered only when it
comes with the key that made it: for any other key the response does not
exist (404, as for an unknown id).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from gateway.errors import InvalidRequestError, ResponseNotFoundError
from gateway.protocol import relay
from gateway.protocol.engine import EngineRequest
from models.llm import input_items

# The most characters of kept input (all its strings) one replica holds: an
# image's data URL is tens of MB, few tokens, and stored twice (here and in
# the engine). Past it the oldest are dropped as past ``size``.
INPUT_CHARS = 1 << 30

# What an engine answers about a stored response; the replica answers its input items itself.
STORED = ("responses_retrieve", "responses_cancel", "responses_delete")
_NAMING = (*STORED, "responses_input_items")


class _Kept(NamedTuple):
    owner: str  # the API key that made it
    input: Any  # its request's ``input``, as sent
    background: bool = False
    chars: int = 0  # of its input's strings


def _chars(value: Any) -> int:
    """The characters of ``value``'s strings (JSON's objects and lists walked,
    without recursion: a body may nest as deep as the JSON parser allows)."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(key) for key in item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return total


class StoredResponses:
    """See the module docstring. ``replica`` is the replica's id (in every
    response id it makes); ``forget`` drops a response from the engine."""

    def __init__(
        self, replica: str, size: int, forget: Callable[[str], None], input_chars: int = INPUT_CHARS
    ) -> None:
        self.replica = replica
        self.size = size
        self._forget = forget
        self._input_chars = input_chars
        self._chars = 0  # of the kept responses' input
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._generating: set[str] = set()  # kept, and not yet stored by the engine
        self._running: set[str] = set()  # every admitted response not yet ended, kept or not
        self._stored_of: dict[str, OrderedDict[str, None]] = {}  # each key's stored ones, oldest first

    def __len__(self) -> int:
        return len(self._kept)

    def check(self, request: EngineRequest) -> None:
        """Raises ResponseNotFoundError (404) when ``request`` names a stored
        response that is not kept here for its key; InvalidRequestError for a
        background response not to be stored (its id could never be polled,
        nor the generation cancelled: each would be 404)."""
        if request.endpoint == "responses" and request.body.get("background") is True:
            if request.body.get("store", True) is not True:
                raise InvalidRequestError(
                    "A background response is polled and cancelled by its id, which only a stored "
                    "response keeps: set 'store' to true, or leave it out.",
                    param="store",
                )
        if request.endpoint in ("responses", "responses_input_tokens"):
            previous = request.body.get("previous_response_id")
            if isinstance(previous, str):
                self._owned(previous, request.owner, "previous_response_id")
                if previous in self._generating:  # the engine keeps its answer only once it ends
                    raise InvalidRequestError(
                        f"Previous response with id '{previous}' is still in progress: "
                        "it can be continued once it has completed.",
                        param="previous_response_id",
                    )
        elif request.endpoint in _NAMING:
            response_id = request.body.get("response_id")
            self._owned(response_id if isinstance(response_id, str) else "", request.owner, "response_id")
            if request.endpoint == "responses_cancel" and response_id in self._generating:
                if not self._kept[response_id].background:  # (the engine stores it only at its end: 404)
                    raise not_cancellable("in_progress", False)

    def admit(self, request: EngineRequest) -> EngineRequest:
        """``request`` as the engine gets it, once checked: a new response's
        engine request id is this replica's id and the request's, so that
        the response's id (``resp_`` + it) names this replica; one to be
        stored is kept for its key from now on."""
        self.check(request)
        if request.endpoint != "responses":
            return request
        named = request.request_id
        if (taken := relay.response_id(self.replica, named)) in self._kept or taken in self._running:
            # Its request id was sent before (a client's own ``x-request-id``,
            # reused or retried, by this key or another, and maybe not to be
            # stored): a response id of its own, never another's, whose end
            # would otherwise drop this one.
            named += "-" + secrets.token_hex(4)
        self._running.add(relay.response_id(self.replica, named))
        # (``store: null`` is vLLM's false: it stores only what it is asked to.)
        if self.size > 0 and request.body.get("store", True) is True:
            response_id = relay.response_id(self.replica, named)
            given = request.body.get("input")
            kept = _Kept(request.owner, given, request.body.get("background") is True, _chars(given))
            self._kept[response_id] = kept
            self._chars += kept.chars
            self._generating.add(response_id)
        return dataclasses.replace(request, request_id=self.replica + named)

    @contextlib.contextmanager
    def unless_refused(self, request: EngineRequest) -> Iterator[None]:
        """Around the engine's call for an admitted ``request``: a new response
        the engine refuses (or that is left before its answer) is not kept,
        nor its input, which may be far larger than any window (a prompt
        refused as too long)."""
        try:
            yield
        except BaseException:
            self.ended(request, stored=False)
            raise

    def ended(self, request: EngineRequest, stored: bool = True) -> None:
        """The generation of an admitted ``request`` is over (a background
        response's too); ``stored``: it ended as the engine stores a response
        (not refused, nor left before its end). A new response deleted
        meanwhile, or not stored, is dropped from the engine (again), which
        stores a response as it ends; one stored may drop another (``_to_drop``)."""
        if request.endpoint != "responses":
            return
        response_id = relay.RESPONSE_PREFIX + request.request_id  # admitted: the replica's id leads it
        self._generating.discard(response_id)
        self._running.discard(response_id)
        if not stored or response_id not in self._kept:
            if (kept := self._kept.pop(response_id, None)) is not None:
                self._chars -= kept.chars
            self._forget(response_id)
            return
        self._kept.move_to_end(response_id)  # oldest first: in the order the engine stored them
        self._stored_of.setdefault(self._kept[response_id].owner, OrderedDict())[response_id] = None
        while len(self._kept) - len(self._generating) > self.size or (
            self._chars > self._input_chars and len(self._kept) > len(self._generating)
        ):
            self._drop(self._to_drop())

    def _to_drop(self) -> str:
        """The stored response to drop for room: the oldest of all, unless a
        key keeps more than half the room (one at most); then its own oldest.
        So one key's flood of responses cannot push out the others', and a
        key gone quiet does not keep its responses for ever."""
        half = max(1, self.size // 2)
        big = next((own for own in self._stored_of.values() if len(own) > half), None)
        if big is not None:
            return next(iter(big))
        return next(kept for kept in self._kept if kept not in self._generating)

    def _drop(self, response_id: str) -> None:
        """Forgets the stored ``response_id`` here and in the engine."""
        self._unstore(response_id, self._kept.pop(response_id))
        self._forget(response_id)

    def _unstore(self, response_id: str, kept: _Kept) -> None:
        self._chars -= kept.chars
        own = self._stored_of.get(kept.owner)
        if own is not None:
            own.pop(response_id, None)
            if not own:
                del self._stored_of[kept.owner]

    def deleted(self, request: EngineRequest) -> None:
        """Forgets the response a ``responses_delete`` request named, once
        the engine has deleted it: its id is unknown from now on."""
        if request.endpoint == "responses_delete":
            response_id = request.body.get("response_id")
            kept = self._kept.pop(response_id, None) if isinstance(response_id, str) else None
            if kept is not None:
                self._unstore(str(response_id), kept)
                self._generating.discard(str(response_id))  # (its end drops it from the engine again)
                self._forget(str(response_id))

    def input_items(self, request: EngineRequest) -> bytes:
        """The page of input items a ``responses_input_items`` request asks
        for (``after``, ``limit``, ``order``, checked by the ingress)."""
        self.check(request)
        body = request.body
        response_id = str(body["response_id"])
        items = input_items.items_of(response_id, self._kept[response_id].input)
        return input_items.page(items, body.get("after"), int(body.get("limit", 20)), str(body.get("order", "desc")))

    def _owned(self, response_id: str, owner: str, param: str) -> None:
        kept = self._kept.get(response_id)
        if kept is None or kept.owner != owner:
            raise ResponseNotFoundError.for_id(response_id, param)



def deleted_body(response_id: str) -> bytes:
    """What ``DELETE /v1/responses/{id}`` answers, as OpenAI does."""
    return json.dumps({"id": response_id, "object": "response", "deleted": True}, separators=(",", ":")).encode()


def not_streamable() -> InvalidRequestError:
    """A stored response asked for as a stream (``GET /v1/responses/{id}?stream=true``)
    that has no events kept: only a background one streamed when made has."""
    return InvalidRequestError(
        "Only a response created with `background` and `stream` both true can be streamed again; "
        "retrieve this one without `stream`.",
        param="stream",
    )


def not_cancellable(status: str, background: bool) -> InvalidRequestError:
    """A stored response that cannot be cancelled: one answered at once, or a
    background one that has already ended (``status``)."""
    if background:
        message = f"Only a background response still queued or in progress can be cancelled; this one is {status}."
    else:
        message = "Only a background response can be cancelled; this one was answered at once."
    return InvalidRequestError(message, param="response_id")
