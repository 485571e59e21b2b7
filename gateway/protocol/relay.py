"""The stream relay's wire: an ingress asks an LLM replica for a stream over
the replica's own HTTP port, and passes the bytes on as they arrive.

Tokens never cross a Serve handle: the handle only picks the replica and holds
its slot (``choose_replica``); the replica publishes where it listens in its
Serve replica metadata (``relay``: host, port, token, and ``replica``, its
opaque id).

A new connection first proves the port holds the token (``port_proof``:
the ingress's challenge line, the port's answer); then requests, one at a
time per connection, which stays open for the next
once an answer has ended (unless either side says ``connection: close``)::

    POST /relay/<endpoint> HTTP/1.1
    authorization: Bearer <token>
    x-request-id: <request id>
    x-gateway-model: <concrete model>
    x-gateway-owner: <API key id>          (when the request came with a key)
    x-gateway-handoff: offer               (the ingress may hand over its client's socket)
    content-length: <n>

    <the client's JSON body, `model` naming the concrete model>

Response:

- ``200``, ``text/event-stream``: the SSE bytes exactly as the client gets
  them, then ``END`` (one NUL byte, which JSON text never contains raw) and
  the stream's ``Outcome`` as JSON on one line, ended by a newline. A stream
  whose connection closes without ``END`` was cut short.
- any other status: ``content-length`` and the error as JSON
  (``GatewayError.to_wire``), known before the first byte of the stream.

Handing over the client's socket: a replica with a handoff port (an
abstract Unix socket its address names, ``handoff``) answers a stream that
was offered one with the head, ``x-relay-handoff: <ticket> <n>`` among its
headers, and the first ``n`` bytes of the stream (the frames it had at
once: the ingress writes them to the client itself), and waits. The
ingress then either sends the ticket and its
client's socket (``SCM_RIGHTS``) to that port, and the replica writes the
stream to the client itself, each frame one HTTP chunk; a stream that ends
(an error frame of its own included) ends the chunked body there too, with
its last frame, as ``vllm serve`` does (the outcome's ``body_ended``). The
replica closes its copy of the socket before ``END`` and the outcome, which
still come over the relay connection; or the ingress writes ``RELAY_OWN``
(one byte) on the relay connection, and the stream follows there as above.
The tokens then cross one socket between the engine and the client, as
behind ``vllm serve``.

Closing the connection (or only its sending side) while an answer runs
aborts the engine request; after a half-close the replica still writes
``END`` and the outcome (what was generated until then), then closes. An
ingress that stops an answer writes ``LEFT`` (one byte) before it closes: a
stream handed over whose connection ends without it lost its ingress (the
process died), not its client, and goes on to its end. A
connection is never used for another request after such an abort, nor after
a background response (its outcome follows when it has finished generating,
and the replica closes after it).

With ``x-gateway-op: count`` the replica generates nothing: it answers
``200`` with ``{"tokens": n}``, the prompt's tokens plus the most the request
may generate (what an API key's token limit reserves), or the error the
request would have met.

Stored responses (OpenAI's Responses API) live on the replica that made
them: a response's id is ``resp_`` + the replica's id (``REPLICA_CHARS`` hex
digits) + the request's id, so any ingress can tell which replica to ask
for it (``response_replica``), with no state of its own.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any, NamedTuple

from typing_extensions import Self

from gateway.protocol.engine import Endpoint, EngineRequest, Outcome

END = b"\x00"
METADATA_KEY = "relay"
PATH_PREFIX = "/relay/"
MODEL_HEADER = "x-gateway-model"
OP_HEADER = "x-gateway-op"
COUNT = "count"
OWNER_HEADER = "x-gateway-owner"
HANDOFF_HEADER = "x-gateway-handoff"
OFFER = "offer"
TICKET_HEADER = "x-relay-handoff"
# What reads or changes a stored response (Responses API) and generates
# nothing: answered at once, never queued behind the replica's generations
# nor refused for the ingress's count of them.
STORED_ONLY = frozenset({"responses_retrieve", "responses_cancel", "responses_delete", "responses_input_items"})
TICKET_BYTES = 16
RELAY_OWN = b"r"
LEFT = b"x"
REQUEST_ID_HEADER = "x-request-id"
MAX_HEAD_BYTES = 16 * 1024
# Connections a replica's relay and handoff ports queue before it accepts
# them (the kernel caps it at net.core.somaxconn): an ingress opens one per
# stream, and a replica's loop, busy with the engine's output, accepts them
# in turns. Past the queue a connection's SYN is dropped and retried a
# second or more later; asyncio's default of 100 cost a burst of 1,500
# streams seconds of first-token time.
BACKLOG = 4096
ENDPOINTS: frozenset[str] = frozenset(
    {
        "chat",
        "completion",
        "responses",
        "responses_retrieve",
        "responses_cancel",
        "responses_delete",
        "responses_input_items",
        "responses_input_tokens",
        "messages",
        "messages_count",
        "tokenize",
        "detokenize",
    }
)
RESPONSE_PREFIX = "resp_"
REPLICA_CHARS = 12
_HEX = frozenset("0123456789abcdef")
_encode = json.JSONEncoder(separators=(",", ":")).encode  # compact JSON, one encoder for every call


def response_id(replica: str, request_id: str) -> str:
    """The id of the response ``replica`` makes for request ``request_id``."""
    return f"{RESPONSE_PREFIX}{replica}{request_id}"


def response_replica(response_id: str) -> str | None:
    """The id of the replica that made (and stores) the response
    ``response_id``; None for an id this gateway did not make."""
    replica = response_id[len(RESPONSE_PREFIX) : len(RESPONSE_PREFIX) + REPLICA_CHARS]
    if not response_id.startswith(RESPONSE_PREFIX) or len(response_id) <= len(RESPONSE_PREFIX) + REPLICA_CHARS:
        return None
    return replica if _HEX.issuperset(replica) else None


class RelayAddress(NamedTuple):
    """Where a replica takes relayed streams, the token it asks for, its id
    (``REPLICA_CHARS`` hex digits; "" for replicas that store nothing) and
    the abstract Unix socket that takes clients' sockets ("" for none).
    (Subclasses name other token-guarded ports under another ``metadata_key``.)"""

    host: str
    port: int
    token: str
    replica: str = ""
    handoff: str = ""

    @classmethod
    def metadata_key(cls) -> str:
        return METADATA_KEY

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Self | None:
        """The address in a replica's Serve metadata; None for replicas without one."""
        entry = metadata.get(cls.metadata_key())
        if not isinstance(entry, dict):
            return None
        return cls(
            str(entry["host"]),
            int(entry["port"]),
            str(entry["token"]),
            str(entry.get("replica", "")),
            str(entry.get("handoff", "")),
        )

    def metadata(self) -> dict[str, Any]:
        return {self.metadata_key(): self._asdict()}


def encode_request(call: EngineRequest, token: str, op: str | None = None, offer: bool = False) -> bytes:
    """The HTTP request that asks a replica for ``call``'s stream (or, with
    ``op=COUNT``, for its token count); ``offer``: the client's socket may be
    handed over."""
    body = _encode(call.body).encode()
    head = (
        f"POST {PATH_PREFIX}{call.endpoint} HTTP/1.1\r\n"
        f"host: relay\r\n"
        f"authorization: Bearer {token}\r\n"
        f"{REQUEST_ID_HEADER}: {call.request_id}\r\n"
        f"{MODEL_HEADER}: {call.model}\r\n"
        + (f"{OWNER_HEADER}: {call.owner}\r\n" if call.owner else "")
        + (f"{OP_HEADER}: {op}\r\n" if op else "")
        + (f"{HANDOFF_HEADER}: {OFFER}\r\n" if offer else "")
        + "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"connection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


class RequestHead(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]

    @property
    def endpoint(self) -> Endpoint | None:
        """The relay endpoint the path names; None for any other path."""
        name = self.path.removeprefix(PATH_PREFIX)
        if not self.path.startswith(PATH_PREFIX) or name not in ENDPOINTS:
            return None
        return name  # type: ignore[return-value]

    @property
    def offers_handoff(self) -> bool:
        """Whether the ingress may hand over its client's socket for this stream."""
        return self.headers.get(HANDOFF_HEADER, "") == OFFER

    @property
    def keep_alive(self) -> bool:
        """Whether the caller keeps the connection for another request (HTTP/1.1's default)."""
        return self.headers.get("connection", "").lower() != "close"

    def content_length(self) -> int:
        """The body's length; raises ValueError when missing or malformed."""
        length = int(self.headers["content-length"]) if "content-length" in self.headers else -1
        if length < 0:
            raise ValueError("content-length is required")
        return length


def parse_head(raw: bytes) -> RequestHead:
    """The request line and headers (names lower-cased); raises ValueError when malformed."""
    lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    return RequestHead(method, path, headers)


def response_head(
    status: int,
    media_type: str,
    length: int | None = None,
    keep: bool = False,
    ticket: bytes = b"",
    first: int = 0,
) -> bytes:
    """A response's status line and headers; without ``length`` the body ends at
    ``END``. ``keep``: the connection stays open for another request;
    ``ticket``: after its ``first`` bytes the stream waits for the client's
    socket or ``RELAY_OWN``."""
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}", f"content-type: {media_type}"]
    if length is not None:
        lines.append(f"content-length: {length}")
    if ticket:
        lines.append(f"{TICKET_HEADER}: {ticket.hex()} {first}")
    lines.append("connection: keep-alive" if keep else "connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ResponseStatus(NamedTuple):
    status: int
    length: int | None  # None: the body ends at END
    ticket: bytes = b""  # the stream waits for a handoff (``TICKET_HEADER``)
    first: int = 0  # after this many bytes


def status_of(head: bytes) -> ResponseStatus:
    """A response head's status, content-length and handoff ticket."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, ticket, first = None, b"", 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == TICKET_HEADER:
            hexed, _, count = value.strip().partition(" ")
            ticket, first = bytes.fromhex(hexed), int(count or 0)
    return ResponseStatus(status, length, ticket, first)


_OUTCOME_FIELDS = tuple(field.name for field in fields(Outcome))


def encode_outcome(outcome: Outcome) -> bytes:
    """The outcome's line (JSON text holds no raw newline), newline included."""
    # Field by field: ``dataclasses.asdict`` deep-copies, and this runs once per request.
    return _encode({name: getattr(outcome, name) for name in _OUTCOME_FIELDS}).encode() + b"\n"


def decode_outcome(raw: bytes) -> Outcome:
    """The outcome on a line ``encode_outcome`` wrote. Fields it does not know
    (a replica of a newer version, while a model rolls over to it) are passed
    over, and those the line lacks take their defaults; ValueError for a line
    that is no outcome."""
    fields = json.loads(raw)
    if not isinstance(fields, dict):
        raise ValueError("an outcome is a JSON object")
    known = {name: fields[name] for name in _OUTCOME_FIELDS if name in fields}
    known["inter_token_counts"] = tuple(known.get("inter_token_counts") or ())
    # A replica of a version before ``stopped`` does not say whether it wrote
    # every byte: not known to be whole (every field is on a newer one's line).
    known.setdefault("stopped", True)
    return Outcome(**known)
