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
- A Messages API prefill (a last ``assistant`` message, whose text the
  answer continues) ending in whitespace: refused as Anthropic refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import InvalidRequestError


def check_not_empty(body: Mapping[str, Any], field: str) -> None:
    """Refuses (400, ``empty_array``) a ``field`` of ``body`` that is an empty
    array, or a completion's batch ``prompt`` holding one (``[[]]``: vLLM's
    engine refused it naming no field, "The decoder prompt cannot be empty")."""
    value = body.get(field)
    if value == []:
        _empty(field)
    if field == "prompt" and isinstance(value, list):
        for index, one in enumerate(value):
            if one == []:
                _empty(f"{field}[{index}]")


def _empty(place: str) -> None:
    raise InvalidRequestError(
        f"Invalid '{place}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        param=place,
        code="empty_array",
    )


def check_input(body: Mapping[str, Any]) -> None:
    """A Responses API request's ``input``: an empty array only continues a
    conversation (``previous_response_id``) or follows ``instructions``;
    with neither there is nothing to answer."""
    if not body.get("previous_response_id") and not body.get("instructions"):
        check_not_empty(body, "input")


def check_prefill(body: Mapping[str, Any]) -> None:
    """Refuses a Messages API request whose last message, an ``assistant``
    prefill, ends in whitespace, as Anthropic's API does: the answer
    continues that text, and a model seldom continues well after a space."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, list):
        blocks = [b for b in content if isinstance(b, dict)]
        content = blocks[-1].get("text") if blocks and blocks[-1].get("type") == "text" else None
    if last.get("role") == "assistant" and isinstance(content, str) and content and content != content.rstrip():
        raise InvalidRequestError(
            "messages: final assistant content cannot end with trailing whitespace",
            param=f"messages[{len(messages) - 1}].content",
        )


def check_message_content(body: Mapping[str, Any]) -> None:
    """Refuses, in Anthropic's words, a Messages API user (or system) turn
    with nothing in it (``""``, ``[]``) and an empty text block in one:
    vLLM drops those, and a user turn left empty vanished, so the
    assistant's turn before it was continued as a prefill, the user's
    question unanswered. An assistant's turn passes as it is: vLLM's own
    answer to a request that generated no text is an empty text block (or,
    streamed, no block), which a client sends back as the conversation goes on."""
    messages = body.get("messages")
    for at, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict) or message.get("role") == "assistant":
            continue  # (what is not an object: vLLM's schema refuses it)
        content = message.get("content")
        if content in ("", []):
            raise InvalidRequestError(
                f"messages.{at}: all messages must have non-empty content except for the optional final "
                "assistant message",
                param=f"messages[{at}].content",
            )
        _check_text_blocks(content, f"messages.{at}.content", f"messages[{at}].content")
    _check_text_blocks(body.get("system"), "system", "system")


def _check_text_blocks(blocks: Any, words: str, param: str) -> None:
    for at, block in enumerate(blocks if isinstance(blocks, list) else ()):
        if isinstance(block, dict) and block.get("type") == "text" and block.get("text") == "":
            raise InvalidRequestError(
                f"{words}.{at}: text content blocks must be non-empty", param=f"{param}[{at}].text"
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
