"""What a request's prompt must be before vLLM reads it, refused naming the
field where vLLM names none.

- An empty array where the prompt goes (chat's and the Messages API's
  ``messages``, the Responses API's ``input``, a completion's ``prompt``):
  vLLM refused it naming no field ("Cannot apply chat template to an empty
  conversation", "You must pass at least one prompt"); refused here as
  OpenAI refuses one, ``Invalid 'messages': empty array...``, code
  ``empty_array``. The Responses API's ``input`` only where nothing else
  makes a conversation (no ``instructions``, no ``previous_response_id``).
- Token ids outside the model's vocabulary: in a completion's ``prompt``
  vLLM refused them naming no field; ``/detokenize`` decoded them as
  nothing (``[999999]`` came back as an empty text) or, past 64 bits, failed
  with a Rust error. Refused here naming the id's place (``prompt[1][0]``,
  ``tokens[2]``), with the bound vLLM's renderer puts on a prompt's ids.
- A Messages API turn whose ``role`` is not ``user`` or ``assistant``:
  vLLM's schema also takes ``system`` there (and listed it among the
  supported roles), where Anthropic takes a system prompt only as the
  top-level ``system``; refused naming ``messages[i].role``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import InvalidRequestError


def check_not_empty(body: Mapping[str, Any], field: str) -> None:
    """Refuses (400, ``empty_array``) a ``field`` of ``body`` that is an empty array."""
    if body.get(field) == []:
        raise InvalidRequestError(
            f"Invalid '{field}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param=field,
            code="empty_array",
        )


def check_input(body: Mapping[str, Any]) -> None:
    """A Responses API request's ``input``: an empty array only continues a
    conversation (``previous_response_id``) or follows ``instructions``;
    with neither there is nothing to answer."""
    if not body.get("previous_response_id") and not body.get("instructions"):
        check_not_empty(body, "input")


# The roles Anthropic's Messages API takes in ``messages``.
MESSAGE_ROLES = ("user", "assistant")


def check_message_roles(body: Mapping[str, Any]) -> None:
    """Refuses (400, ``invalid_value``) the first turn of a Messages API
    ``body`` whose ``role`` is a string other than ``user`` or ``assistant``,
    saying where a system prompt goes; other shapes are left to the schema."""
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        role = message.get("role") if isinstance(message, Mapping) else None
        if not isinstance(role, str) or role in MESSAGE_ROLES:
            continue
        param = f"messages[{index}].role"
        supported = ", ".join(f"'{name}'" for name in MESSAGE_ROLES)
        hint = " A system prompt goes in the top-level `system` parameter, not in `messages`."
        if role != "system":
            hint = ""
        raise InvalidRequestError(
            f"Invalid value for '{param}': {role!r}. Supported values are: {supported}.{hint}",
            param=param,
            code="invalid_value",
        )


def check_prompt_ids(prompt: Any, largest: int | None) -> None:
    """Refuses token ids outside the vocabulary in a (vLLM-parsed) completion
    ``prompt``: one prompt of ids, or a batch whose prompts may be ids."""
    if not isinstance(prompt, list) or not prompt:
        return
    if _ids(prompt):
        check_token_ids(prompt, largest, "prompt")
        return
    for index, one in enumerate(prompt):
        if isinstance(one, list) and _ids(one):
            check_token_ids(one, largest, f"prompt[{index}]")


def _ids(values: list[Any]) -> bool:
    return all(isinstance(value, int) for value in values)


def check_token_ids(tokens: Sequence[int], largest: int | None, field: str = "tokens") -> None:
    """Refuses (400) the first id of ``tokens`` outside 0 to ``largest`` (None: no bound known)."""
    if largest is None:
        return
    for index, token in enumerate(tokens):
        if not 0 <= token <= largest:
            raise InvalidRequestError(
                f"Invalid '{field}[{index}]': token id {token} is not in the model's vocabulary (0 to {largest}).",
                param=f"{field}[{index}]",
            )
