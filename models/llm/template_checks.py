"""A chat template sent with a request: refused naming the field.

vLLM renders chat messages with the model's own template and runs a
request's template (``chat_template``, or one in ``chat_template_kwargs``)
only when its server trusts requests with one: a template is code the
server would run. The gateway does not: vLLM would refuse in its command
line's words ("--trust-request-chat-template is not set"), naming no field;
here the request is refused before vLLM sees it, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequestError


def check_request_template(body: Mapping[str, Any]) -> None:
    """Refuses (400, ``unsupported_parameter``) a body that sends a chat template."""
    kwargs = body.get("chat_template_kwargs")
    if body.get("chat_template") is not None:
        field = "chat_template"
    elif isinstance(kwargs, Mapping) and kwargs.get("chat_template") is not None:
        field = "chat_template_kwargs"
    else:
        return
    raise InvalidRequestError(
        f"Unsupported parameter: '{field}': a chat template sent with a request is not run (it is code "
        "the server would execute); messages are rendered with the model's own template.",
        param=field,
        code="unsupported_parameter",
    )
