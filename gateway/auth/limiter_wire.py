"""What an ingress replica and the shared ledger say to each other
(``gateway.auth.limiter`` and ``gateway.auth.limiter_server``): where the
ledger listens, the timings both sides keep to, and how a decision travels
(one JSON line each way)."""

from __future__ import annotations

from typing import Any

from gateway.auth.ledger import Decision, Limits, Refusal, Usage
from gateway.protocol.relay import RelayAddress

METADATA_KEY = "limiter"
CONNECT_TIMEOUT_S = 2.0
READ_BYTES = 256 * 1024
REPLY_TIMEOUT_S = 2.0
RECALL_WAIT_S = 0.5  # longest a request waits for other replicas' leases to come back
RESTORE_GRACE_S = 1.0  # how long a new ledger waits for every replica to tell it what is in flight


class LimiterAddress(RelayAddress):
    """Where the ledger listens, and the token it asks for."""

    @classmethod
    def metadata_key(cls) -> str:
        return METADATA_KEY


def limits_of(data: list[int | None]) -> Limits:
    return Limits(*data)


def encode_decision(decision: Decision) -> dict[str, Any]:
    refusal = decision.refusal
    return {
        "r": decision.reservation,
        "usage": list(decision.usage.__dict__.values()),
        "refusal": list(refusal.__dict__.values()) if refusal is not None else None,
    }


def decode_decision(data: dict[str, Any]) -> Decision:
    refusal = data.get("refusal")
    return Decision(
        data.get("r"), Usage(*data["usage"]), Refusal(*refusal) if refusal is not None else None
    )


def given_back(asked: dict[str, Any], reply: dict[str, Any]) -> list[dict[str, Any]]:
    """What gives back all that ``reply`` booked for ``asked`` (a ``reserve``
    or ``lease`` message) when no one waits for it any more (its request was
    cancelled, or stopped waiting): a reservation never used, a lease never
    opened. Each ends with nothing counted."""
    back = []
    if reply.get("r") is not None:
        back.append({"op": "release", "r": reply["r"], "requests": 1, "tokens": int(asked.get("tokens", 0)),
                     "places": 1, "left": 0, "end": True})
    lease = reply.get("lease")
    if lease is not None:
        reservation, requests, tokens, places = lease[:4]
        back.append({"op": "release", "r": reservation, "requests": requests, "tokens": tokens,
                     "places": places, "left": 0, "end": True, "closed": True})
    return back
