"""A Responses API request's conversation, where the gateway has vLLM render
it rather than vLLM's own ``_render_resolved_response_inputs``:

- A follow-up (``previous_response_id``) on a response that called tools:
  vLLM carries the previous response's message items only, so the model saw
  a ``function_call_output`` with no call before it (OpenAI's function
  calling loop continues with ``previous_response_id``). Here the previous
  output becomes chat messages as vLLM makes them of the same items sent in
  ``input`` (a call an assistant message's ``tool_calls``).
- ``truncation: "auto"``, as OpenAI's: a conversation that does not fit the
  context window with its output budget drops items from its beginning (the
  previous response's conversation first, then its answer, then the oldest
  input items), the fewest that make it fit, cutting only where a user turn
  begins what is left (a chat template may require one there; a call's
  output never loses its call). The request's ``instructions`` and its last
  input item always stay; where nothing fits, the shortest cut is rendered
  for the caller to refuse as with ``"disabled"`` (400
  ``context_length_exceeded``). Each try renders with vLLM's own truncation
  off: it cut the prompt's tokens (the model started mid-message, without
  the chat template's opening) and lowered the output budget, and a prompt it
  has cut cannot tell whether the whole would fit. A binary search over
  where to cut: a few renders however long the conversation.

Not for gpt-oss (harmony) models, whose conversations vLLM keeps in another
form: those keep vLLM's own rendering and truncation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.errors import InvalidRequestError

# Output items that are tool calls, which vLLM does not carry into a follow-up.
_CALLS = ("function_call", "custom_tool_call")
# vLLM's errors for a prompt beyond the window (``vllm.renderers.params``), by their parameter.
_TOO_LONG = ("input_tokens", "input_text")


def takes_over(request: Any, previous: Any) -> bool:
    """Whether the gateway renders ``request`` (vLLM-parsed), continuing
    stored response ``previous`` (None: none), rather than vLLM's own render."""
    return request.truncation == "auto" or (previous is not None and any(_kind(o) in _CALLS for o in previous.output))


async def render(responses: Any, request: Any, previous: Any, fits: Callable[[Any], bool], **kwargs: Any) -> Any:
    """The render of ``request`` continuing ``previous``, what ``fits`` of it
    where its truncation is ``"auto"`` (see the module docstring); vLLM's
    ``ErrorResponse`` is returned, its other failures raised, as its own render's."""
    kept = _Conversation(responses, request, previous, kwargs)
    if request.truncation != "auto":
        return await kept.render(0)
    try:
        whole = await kept.render(0)
    except Exception as exc:  # noqa: BLE001 - vLLM's refusal of a prompt beyond the window: cut it
        if getattr(exc, "parameter", None) not in _TOO_LONG:
            raise
    else:
        if not hasattr(whole, "engine_input") or fits(whole):
            return whole
    cuts = kept.cuts()
    low, high, best = 0, len(cuts) - 1, None
    while low <= high:
        middle = (low + high) // 2
        tried = await kept.attempt(cuts[middle])
        if tried is not None and fits(tried):
            best, high = tried, middle - 1
        else:
            low = middle + 1
    return best if best is not None else await kept.render(cuts[-1] if cuts else kept.droppable)


class _Conversation:
    """What a Responses request is prompted with, oldest first, in the forms
    vLLM's renderer takes: the previous response's conversation (chat
    messages), its output items (or, where it called tools, chat messages
    made of them), and the request's input items."""

    def __init__(self, responses: Any, request: Any, previous: Any, options: dict[str, Any]) -> None:
        self._responses = responses
        self._options = options  # the render call's own (``skip_mm_cache``)
        self.messages: list[Any] = []
        self.outputs: list[Any] = []
        if previous is not None:
            stored = responses.msg_store.get(previous.id)
            # vLLM leaves a stored conversation's system messages out of a follow-up.
            self.messages = [m for m in (stored or ()) if m.get("role") != "system"]
            self.outputs = list(previous.output)
            if any(_kind(o) in _CALLS for o in self.outputs):
                self.messages += _as_messages(self.outputs)
                self.outputs = []
        self._text = isinstance(request.input, str)
        self.items: list[Any] = [request.input] if self._text else list(request.input)
        self.droppable = len(self.messages) + len(self.outputs) + len(self.items) - 1
        # Each try renders with vLLM's truncation off (see the module docstring).
        self._whole = request if request.truncation != "auto" else request.model_copy(update={"truncation": "disabled"})

    def cuts(self) -> list[int]:
        """How many of the oldest items may be dropped: where a user turn begins the rest."""
        entries = [*self.messages, *self.outputs, *self.items]
        return [at for at in range(1, self.droppable + 1) if _role(entries[at]) == "user"]

    async def attempt(self, dropped: int) -> Any:
        """The render with ``dropped`` items left out; None where vLLM refuses it
        (too long, or a template that takes no conversation beginning there)."""
        try:
            result = await self.render(dropped)
        except Exception:  # noqa: BLE001 - this cut does not serve; another may
            return None
        return result if hasattr(result, "engine_input") else None

    async def render(self, dropped: int) -> Any:
        """vLLM's render of the request with its ``dropped`` oldest items left out."""
        messages = self.messages[dropped:]
        dropped = max(0, dropped - len(self.messages))
        outputs = self.outputs[dropped:]
        dropped = max(0, dropped - len(self.outputs))
        items = self.items[dropped:]
        request = self._whole.model_copy(update={"input": items[0] if self._text else items})
        return await self._responses.online_renderer.render_responses(
            request,
            previous_messages=messages or None,
            previous_response_outputs=outputs or None,
            tool_server=self._responses.tool_server,
            **self._options,
        )


def _as_messages(outputs: list[Any]) -> list[Any]:
    """A response's output items as the chat messages vLLM makes of them in
    ``input`` (reasoning left out, as vLLM leaves it out of a follow-up)."""
    from vllm.entrypoints.openai.responses.utils import construct_chat_messages_with_tool_call

    return list(construct_chat_messages_with_tool_call([o for o in outputs if _kind(o) != "reasoning"]))


def _kind(item: Any) -> Any:
    return item.get("type") if isinstance(item, dict) else getattr(item, "type", None)


def _role(entry: Any) -> Any:
    if isinstance(entry, str):
        return "user"
    return entry.get("role") if isinstance(entry, dict) else getattr(entry, "role", None)


# Input items that answer a tool call, and the calls they answer.
_OUTPUTS = ("function_call_output", "custom_tool_call_output")


def check_call_outputs(responses: Any, body: Mapping[str, Any]) -> None:
    """Refuses (400, as OpenAI does) a tool call's output in ``input`` whose
    ``call_id`` no call before it has: in ``input``, or in the conversation of
    ``previous_response_id`` (its output, its stored messages). vLLM rendered
    it as a tool's answer to nothing."""
    items = body.get("input")
    if not isinstance(items, list) or not any(isinstance(i, dict) and i.get("type") in _OUTPUTS for i in items):
        return
    known: set[Any] = set()
    previous = body.get("previous_response_id")
    if isinstance(previous, str):
        stored = responses.response_store.get(previous)
        known.update(getattr(item, "call_id", None) for item in (stored.output if stored is not None else ()))
        for message in responses.msg_store.get(previous) or ():
            if isinstance(message, dict):
                known.update(call.get("id") for call in message.get("tool_calls") or () if isinstance(call, dict))
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") in _CALLS:
            known.add(item.get("call_id"))
        elif item.get("type") in _OUTPUTS and item.get("call_id") not in known:
            raise InvalidRequestError(
                f"No tool call found for function call output with call_id {item.get('call_id')}.", param="input"
            )
