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
