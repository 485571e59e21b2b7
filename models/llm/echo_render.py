"""The echo engine's answers: its tokens (the prompt's words, up to the
budget or a stop string) and their chat and completions bodies and stream
chunks, in OpenAI's shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Answer:
    """One choice's tokens and why it stopped."""

    tokens: list[str]
    finish_reason: str
    stop: str | None = None  # the stop string that ended it, if one did


@dataclass(slots=True)
class EchoPlan:
    """Everything needed to render a response, computed once per request."""

    kind: str  # "chat" or "completion"
    id: str
    created: int
    model: str
    prompt_tokens: int
    answers: list[Answer]
    logprobs: int | None  # top-k alternatives requested, None when not asked
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return sum(len(a.tokens) for a in self.answers)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
        }


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def answer(text: str, budget: int, stop: str | list[str] | None) -> Answer:
    words = text.split()
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    tokens: list[str] = []
    for i, word in enumerate(words):
        if len(tokens) == budget:
            return Answer(tokens, "length")
        token = word if i == 0 else " " + word
        matched = next((s for s in stops if s and s in "".join(tokens) + token), None)
        if matched is not None:
            return Answer(tokens, "stop", matched)
        tokens.append(token)
    return Answer(tokens, "stop")


def _chat_logprobs(tokens: list[str], top: int) -> dict[str, Any]:
    def entry(token: str) -> dict[str, Any]:
        return {"token": token, "logprob": 0.0, "bytes": list(token.encode())}

    return {
        "content": [{**entry(t), "top_logprobs": [entry(t)] * min(top, 1)} for t in tokens]
    }


def _completion_logprobs(tokens: list[str], top: int, offset: int = 0) -> dict[str, Any]:
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": [0.0] * len(tokens),
        "tokens": list(tokens),
        "top_logprobs": [{t: 0.0} if top else {} for t in tokens],
    }


def _logprobs(plan: EchoPlan, tokens: list[str], offset: int = 0) -> dict[str, Any] | None:
    if plan.logprobs is None:
        return None
    if plan.kind == "chat":
        return _chat_logprobs(tokens, plan.logprobs)
    return _completion_logprobs(tokens, plan.logprobs, offset)


def render(plan: EchoPlan) -> dict[str, Any]:
    """The non-streaming response body."""
    choices = []
    for index, answer in enumerate(plan.answers):
        text = "".join(answer.tokens)
        choice: dict[str, Any] = {"index": index}
        if plan.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
        else:
            choice["text"] = text
        choice["logprobs"] = _logprobs(plan, answer.tokens)
        choice["finish_reason"] = answer.finish_reason
        choices.append(choice)
    return {
        "id": plan.id,
        "object": "chat.completion" if plan.kind == "chat" else "text_completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "usage": plan.usage(),
    }


def chunks(plan: EchoPlan) -> list[dict[str, Any]]:
    """The streaming chunks, in the order OpenAI sends them."""
    obj = "chat.completion.chunk" if plan.kind == "chat" else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": plan.id,
            "object": obj,
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
            **extra,
        }

    out: list[dict[str, Any]] = []
    if plan.kind == "chat":
        for index in range(len(plan.answers)):
            delta = {"role": "assistant", "content": ""}
            out.append(chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]))
    for index, answer in enumerate(plan.answers):
        offset = 0
        tokens = answer.tokens or [""]
        for position, token in enumerate(tokens):
            last = position == len(tokens) - 1
            choice: dict[str, Any] = {"index": index}
            if plan.kind == "chat":
                choice["delta"] = {"content": token}
            else:
                choice["text"] = token
            choice["logprobs"] = _logprobs(plan, [token] if answer.tokens else [], offset)
            choice["finish_reason"] = answer.finish_reason if last else None
            out.append(chunk([choice]))
            offset += len(token)
    if plan.include_usage:
        out.append(chunk([], usage=plan.usage()))
    return out
