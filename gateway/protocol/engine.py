"""What crosses a Ray handle from the ingress to a model replica."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Endpoint = Literal[
    "chat",
    "completion",
    "responses",
    "responses_retrieve",  # GET /v1/responses/{id}: body {"response_id", "stream", "starting_after"}
    "responses_cancel",  # POST /v1/responses/{id}/cancel: body {"response_id"}
    "responses_delete",  # DELETE /v1/responses/{id}: body {"response_id"}
    "responses_input_items",  # GET /v1/responses/{id}/input_items: body {"response_id", "after", "limit", "order"}
    "responses_input_tokens",  # POST /v1/responses/input_tokens
    "messages",  # Anthropic's POST /v1/messages
    "messages_count",  # Anthropic's POST /v1/messages/count_tokens
    "tokenize",  # vLLM's POST /tokenize
    "detokenize",  # vLLM's POST /detokenize
    "embedding",
    "predict",
    "infer",
]

# Endpoints that count a prompt's tokens and generate none.
COUNTING: frozenset[str] = frozenset({"responses_input_tokens", "messages_count", "tokenize", "detokenize"})


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A validated-for-routing request, addressed to one concrete model.

    ``body`` is the client's JSON object as sent, except that an OpenAI body's
    ``model`` names the concrete model that serves it; ``model`` names it for
    every endpoint (predict bodies carry no model field).

    ``replica`` names the one replica that may answer (the holder of a stored
    response the request refers to; ``gateway.protocol.relay.response_replica``),
    None for any. ``owner`` is the id of the API key the request came with
    ("" on an open gateway): stored responses answer only their owner's requests.
    ``arrived`` is set by the replica that receives it.
    """

    endpoint: Endpoint
    body: dict[str, Any]
    request_id: str
    model: str = ""
    replica: str | None = None
    owner: str = ""
    # When the model replica received it (wall clock): the origin of its time
    # to first token, its wait in the replica's queue included. None: when
    # its engine call starts. (Not compared: the same request whenever it came.)
    arrived: float | None = field(default=None, compare=False)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a model replica reports about one answer, besides its bytes.

    Token counts equal the usage the answer carries (or would carry: a
    stream reports them whether or not the client asked for usage). The gaps
    between tokens arrive already bucketed where they were counted:
    ``inter_token_counts`` holds, per bucket of the inter-token histogram
    (``llm_gateway_inter_token_latency_seconds``, ``+Inf`` last), the tokens
    whose gap fell in it, and ``inter_token_sum_s`` the gaps' sum; empty when
    no token followed another. ``batch_size`` is set on exactly one request
    of each batch, so that each batch is counted once. ``error`` and
    ``error_status`` name the error that ended a stream after its first
    byte (its code and HTTP status), None for one that ended well.
    ``client_left``: a stream the replica wrote to the client's socket
    itself (handed over) ended because the client was gone. ``body_ended``:
    such a stream ended and the replica wrote the body's last chunk too, so
    the client has the whole answer before the ingress reads this.
    ``stopped``: the replica stopped the stream before its last byte, as its
    ingress had left; without it, every byte came before the outcome, and a
    client that left after the ingress passed them all on had it whole.
    ``cached_tokens``: of the prompt's, those the engine found in its prefix
    cache (vLLM's count; none for engines without one).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    inter_token_counts: tuple[int, ...] = ()
    inter_token_sum_s: float = 0.0
    batch_size: int | None = None
    error: str | None = None
    error_status: int | None = None
    client_left: bool = False
    body_ended: bool = False
    stopped: bool = False
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """A replica's answer: a whole JSON body, or a stream's last bytes, with its outcome."""

    body: bytes
    outcome: Outcome
