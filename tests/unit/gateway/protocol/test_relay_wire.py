"""gateway/protocol/relay.py: which replica a stored response's id names, and how outcomes travel."""

from __future__ import annotations

import pytest

from gateway.protocol import relay
from gateway.protocol.engine import Outcome


def test_a_response_id_names_the_replica_that_made_it() -> None:
    response_id = relay.response_id("0123456789ab", "f" * 32)
    assert response_id == "resp_0123456789ab" + "f" * 32
    assert relay.response_replica(response_id) == "0123456789ab"


@pytest.mark.parametrize(
    "response_id",
    ["", "resp_", "resp_0123456789ab", "resp_0123456789aZ" + "f" * 32, "chatcmpl-0123456789ab" + "f" * 32, "resp_short"],
)
def test_ids_this_gateway_did_not_make_name_no_replica(response_id: str) -> None:
    assert relay.response_replica(response_id) is None


def test_a_replica_publishes_its_id_with_its_address() -> None:
    address = relay.RelayAddress("10.0.0.2", 4100, "secret", "0123456789ab")
    assert relay.RelayAddress.from_metadata(address.metadata()) == address
    older = {"relay": {"host": "10.0.0.2", "port": 4100, "token": "secret"}}
    assert relay.RelayAddress.from_metadata(older) == relay.RelayAddress("10.0.0.2", 4100, "secret", "")


def test_an_outcome_from_a_replica_of_another_version_is_read_for_what_both_know() -> None:
    """While a model rolls over, an ingress may hear from replicas of the
    next version (fields it does not know) or the last (fields missing)."""
    outcome = Outcome(prompt_tokens=4, completion_tokens=3, inter_token_counts=(2, 1), body_ended=True, cached_tokens=1)
    assert relay.decode_outcome(relay.encode_outcome(outcome)) == outcome
    newer = b'{"prompt_tokens":4,"completion_tokens":3,"inter_token_counts":[2,1],"stopped":false,"spec_decode_tokens":2}'
    assert relay.decode_outcome(newer) == Outcome(prompt_tokens=4, completion_tokens=3, inter_token_counts=(2, 1))
    # One that does not say whether it wrote every byte (``stopped``) is not taken to have.
    assert relay.decode_outcome(b'{"prompt_tokens":4}') == Outcome(prompt_tokens=4, stopped=True)


@pytest.mark.parametrize("line", [b"", b'{"prompt_tok', b"[1, 2]", b"null"])
def test_a_line_that_is_no_outcome_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError):
        relay.decode_outcome(line)
