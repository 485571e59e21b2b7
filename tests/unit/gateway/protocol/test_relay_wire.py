"""gateway/protocol/relay.py: which replica a stored response's id names."""

from __future__ import annotations

import pytest

from gateway.protocol import relay


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
