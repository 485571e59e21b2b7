"""models/llm/token_checks.py: token ids outside the model's vocabulary are refused naming their place."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError
from models.llm.token_checks import check_token_ids


@pytest.mark.parametrize("tokens, param", [([5, 1024], "tokens[1]"), ([-1], "tokens[0]"), ([3, 2**62, -1], "tokens[1]")])
def test_an_id_past_the_vocabulary_is_refused_naming_its_place(tokens: list[int], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_token_ids(tokens, 1023)
    assert (caught.value.status_code, caught.value.param) == (400, param)
    assert "(0 to 1023)" in caught.value.message


def test_ids_in_the_vocabulary_pass_and_no_bound_checks_nothing() -> None:
    check_token_ids([0, 1023], 1023)
    check_token_ids([], 1023)
    check_token_ids([10**9], None)
