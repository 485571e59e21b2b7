"""models/llm/template_checks.py: a chat template sent with a request is refused naming its field."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError
from models.llm.template_checks import check_request_template


@pytest.mark.parametrize(
    "body, field",
    [
        ({"chat_template": "{{ 1 }}"}, "chat_template"),
        ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
        ({"chat_template": "{{ 1 }}", "chat_template_kwargs": {"chat_template": "x"}}, "chat_template"),
    ],
)
def test_a_template_in_the_request_is_refused_naming_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_request_template(body)
    assert (caught.value.status_code, caught.value.param, caught.value.code) == (400, field, "unsupported_parameter")
    assert "--trust" not in caught.value.message  # the server's flags are not the client's business


@pytest.mark.parametrize(
    "body", [{}, {"chat_template": None}, {"chat_template_kwargs": {"enable_thinking": False}}, {"chat_template_kwargs": 3}]
)
def test_bodies_without_a_template_pass(body: dict[str, object]) -> None:
    check_request_template(body)
