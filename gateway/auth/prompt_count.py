"""Prompt tokens counted on the ingress, as the model's engine will count them.

A token limit reserves each request's prompt tokens plus its output budget
before the request is sent. Asking the model's replica to count costs one
more exchange per request, so the ingress counts itself, from a description
of the model's tokenizer its replica gives once (``EngineInfo.tokenizer``):

- ``{"kind": "words"}``: the echo engine's whitespace-separated words;
- ``{"kind": "hf", ...}``: a Hugging Face tokenizer (its ``tokenizer.json``,
  run by the ``tokenizers`` library), the chat template vLLM resolved for
  the model, the content format vLLM detected for it (``openai``: message
  content as a list of text parts; ``string``: parts joined by newlines) and
  the tokenizer's special tokens. Chat messages are rendered the way vLLM
  0.32 prepares them for the template (tool-call arguments as objects, tool
  results as text, tools as vLLM's function dicts) in a Jinja sandbox set up
  as ``transformers`` sets it up, then tokenized without special tokens;
  completion prompts are tokenized with them (vLLM's defaults).

``prompt_tokens`` returns None for anything it does not render exactly as
the engine would (images, a request's own chat template, continuing the
final message, ...): the ingress then asks the replica. The test suite holds
the counts equal to vLLM's own ``prompt_tokens`` over many requests.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any, Protocol


class PromptCounter(Protocol):
    def prompt_tokens(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        """Each prompt's tokens (chat: one), or None when it cannot tell exactly."""
        ...


def counter_for(spec: dict[str, Any] | None) -> PromptCounter | None:
    """The counter a replica's tokenizer description asks for (None: none can count here)."""
    if not spec:
        return None
    if spec.get("kind") == "words":
        return WordCounter()
    if spec.get("kind") == "hf":
        return TemplateCounter(spec)
    return None


# A body over this many bytes is counted in a thread: rendering and tokenizing
# 1 MB of prompt on the ingress's loop held every other request for a second.
INLINE_BYTES = 32 * 1024


async def count(counter: PromptCounter, endpoint: str, body: dict[str, Any], size: int) -> list[int] | None:
    """``counter.prompt_tokens(endpoint, body)``, in a thread for a body of
    more than ``INLINE_BYTES`` (``size``): below, a thread costs more than counting."""
    if size <= INLINE_BYTES:
        return counter.prompt_tokens(endpoint, body)
    return await asyncio.to_thread(counter.prompt_tokens, endpoint, body)


# A completion's output budget when it sets none, or null: OpenAI's and vLLM's.
COMPLETION_BUDGET = 16


def most_tokens(counts: list[int], body: dict[str, Any], window: int | None, endpoint: str) -> int | None:
    """The prompts' tokens plus ``n`` times each one's output budget
    (``max_completion_tokens`` / ``max_tokens``, else the rest of ``window``;
    a completion's, else ``COMPLETION_BUDGET``).

    None (the replica then counts, refusing what it would refuse to
    generate) for anything but a budget the window holds: a budget below 1
    or not an integer, a prompt and budget beyond the window, or no window
    known. A budget that could not be sent is never reserved, nor a negative
    one (which would give the key tokens back)."""
    budget = body.get("max_completion_tokens") or body.get("max_tokens")
    if budget is None and endpoint == "completion":
        budget = COMPLETION_BUDGET
    choices = body.get("n") or 1
    if not _whole(choices) or (budget is not None and not _whole(budget)) or window is None:
        return None
    total = 0
    for prompt in counts:
        if prompt + (budget or 1) > window:
            return None
        total += prompt + choices * (budget if budget is not None else window - prompt)
    return total


def _whole(value: Any) -> bool:
    """A count of at least 1 (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _text_parts(content: Any) -> list[str] | None:
    """A message's text parts; None when it holds anything but text."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return None
    return texts


def _prompts(body: dict[str, Any]) -> list[str | list[int]] | None:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    return None


class WordCounter:
    """The echo engine's count: whitespace-separated words."""

    def prompt_tokens(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        if endpoint not in ("chat", "completion"):
            return None  # the replica counts
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list):
                return None
            total = 0
            for message in messages:
                texts = _text_parts(message.get("content") if isinstance(message, dict) else None)
                if texts is None:
                    return None
                total += len("".join(texts).split())
            return [total]
        prompts = _prompts(body)
        if prompts is None or not all(isinstance(p, str) for p in prompts):
            return None
        return [len(str(p).split()) for p in prompts]


# Chat request fields that change what vLLM renders in ways not mirrored here.
_UNMIRRORED = ("chat_template", "continue_final_message", "documents", "truncate_prompt_tokens",
               "prompt_embeds", "mm_processor_kwargs", "media_io_kwargs")


class TemplateCounter:
    """A Hugging Face tokenizer and chat template, as vLLM applies them."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(spec["tokenizer"])
        self._tokenizer.no_padding()  # (a batch would pad each prompt to the longest)
        self._special = dict(spec.get("special_tokens") or {})
        self._formats = dict(spec.get("content_formats") or {})

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        # Templates by whether the request has tools (vLLM may resolve them apart).
        self._templates = {
            key: env.from_string(text) for key, text in (spec.get("chat_templates") or {}).items() if text
        }

    def prompt_tokens(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        try:
            if endpoint == "chat":
                return self._chat(body)
            if endpoint == "completion":
                return self._completion(body)
            return None  # the replica counts

        except Exception:  # noqa: BLE001 - anything unexpected: the replica counts instead
            return None

    def _completion(self, body: dict[str, Any]) -> list[int] | None:
        if any(body.get(k) is not None for k in ("prompt_embeds", "truncate_prompt_tokens", "suffix")):
            return None
        prompts = _prompts(body)
        if prompts is None:
            return None
        special = body.get("add_special_tokens", True)
        texts = [p for p in prompts if isinstance(p, str)]
        counts = iter(self._lengths(texts, special))
        return [len(p) if isinstance(p, list) else next(counts) for p in prompts]

    def _lengths(self, texts: list[str], special: bool) -> list[int]:
        """The tokens of each of ``texts``: ``encode_batch``, which lets go of
        Python's lock while it runs (``encode`` holds it), so that a long
        prompt counted in a thread (``count``) leaves the ingress's loop free."""
        return [len(encoding.ids) for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=special)]

    def _chat(self, body: dict[str, Any]) -> list[int] | None:
        if any(body.get(k) for k in _UNMIRRORED):
            return None
        tools = body.get("tools")
        if tools is not None and body.get("tool_choice") == "none" and self._formats.get("exclude_none"):
            tools = None
        key = "tools" if tools is not None else "plain"
        template = self._templates.get(key)
        fmt = self._formats.get(key)
        if template is None or fmt not in ("openai", "string"):
            return None
        conversation = _conversation(body.get("messages"), fmt)
        if conversation is None:
            return None
        kwargs = dict(body.get("chat_template_kwargs") or {})
        if "tokenize" in kwargs or "chat_template" in kwargs:
            return None
        rendered = template.render(
            **{**self._special, **kwargs},
            messages=conversation,
            tools=[_tool(t) for t in tools] if tools is not None else None,
            documents=None,
            add_generation_prompt=body.get("add_generation_prompt", True),
        )
        return self._lengths([rendered], bool(body.get("add_special_tokens", False)))


def _conversation(messages: Any, fmt: str) -> list[dict[str, Any]] | None:
    """OpenAI messages as vLLM 0.32 hands them to a chat template (text only)."""
    if not isinstance(messages, list) or not messages:
        return None
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        role = message["role"]
        if role == "developer":
            return None  # vLLM may fold it into the system message: not mirrored
        texts = _text_parts(message.get("content"))
        if texts is None:
            return None
        if role == "system" and texts and texts[0].startswith("x-anthropic-billing-header"):
            return None
        content: Any = [{"type": "text", "text": t} for t in texts] if fmt == "openai" else "\n".join(texts)
        entry: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None:
                entry["tool_calls"] = calls = [_tool_call(c) for c in calls]
                if any(c is None for c in calls):
                    return None
                if not calls:
                    del entry["tool_calls"]
            if message.get("reasoning") is not None:
                entry["reasoning"] = entry["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                entry["tool_call_id"] = message["tool_call_id"]
            entry["content"] = "\n".join(texts)
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    return out


def _tool_call(call: Any) -> dict[str, Any] | None:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        return None
    function = call.get("function")
    if not isinstance(function, dict):
        return None
    arguments = function.get("arguments")
    parsed: Any = {}
    if isinstance(arguments, dict):
        parsed = arguments
    elif isinstance(arguments, str) and arguments:
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
    return {**call, "function": {**function, "arguments": parsed}}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as vLLM's ``ChatCompletionToolsParam.model_dump()`` gives it to the template."""
    function = tool.get("function") or {}
    if tool.get("defer_loading") is not None or function.get("defer_loading") is not None:
        raise ValueError("deferred tools are not mirrored")  # the replica counts instead
    dumped: dict[str, Any] = {
        "name": function.get("name"),
        "description": function.get("description"),
        "parameters": function.get("parameters"),
    }
    if function.get("strict") is not None:
        dumped["strict"] = function["strict"]
    return {"type": tool.get("type", "function"), "function": dumped}
