"""A deterministic engine that echoes the prompt back, in OpenAI's shapes.

Tokens are whitespace-separated words. Chat answers with the text of the last
user message, completions with the prompt, the Responses API with the last
user message of its input (``models.llm.echo_responses``), Anthropic's
Messages API with the last user message (``models.llm.echo_messages``). It honours ``max_tokens`` /
``max_completion_tokens``, ``n``, ``stop``, ``stream``, ``stream_options``,
``logprobs`` (every token is certain: logprob 0) and the context window, at
near-zero cost: it serves fast tests and measures the gateway's own overhead.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from gateway import sse
from gateway.auth.prompt_count import COMPLETION_BUDGET
from gateway.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotSupportedError,
    ResponseNotFoundError,
)
from gateway.protocol.chat import ChatCompletionRequest
from gateway.protocol.completions import CompletionRequest
from gateway.protocol.engine import COUNTING
from gateway.protocol.extras import INPUT_TOKENS_FIELDS, check_fields, check_openai_metadata
from gateway.validation import check_scalars
from models.llm import echo_messages as anthropic
from models.llm import echo_render as render
from models.llm import echo_responses as responses
from models.llm.engine import EngineInfo, body_of, frames_of, input_tokens_body
from models.llm.message_checks import check_chat_messages
from models.llm.prompt_checks import check_input, check_not_empty, check_prefill
from models.llm.sampling_checks import ANTHROPIC_RANGES, check_budget_fits, check_sampling
from models.llm.stored import STORED, deleted_body, not_cancellable, not_streamable

if TYPE_CHECKING:
    from gateway.config import EchoModelConfig
    from gateway.protocol.engine import EngineRequest
    from models.llm.tally import GenerationTally

DEFAULT_CONTEXT = 4096


class EchoEngine:
    """See module docstring. Implements ``models.llm.engine.LLMEngine``."""

    def __init__(self, config: EchoModelConfig) -> None:
        self._name = config.name
        self._max_model_len = config.max_model_len or DEFAULT_CONTEXT
        self._token_delay_s = config.echo_token_delay_ms / 1000
        self._in_flight = 0
        self._stored: dict[str, responses.Stored] = {}

    async def start(self) -> None:
        return None

    async def set_adapters(self, adapters: Mapping[str, str]) -> dict[str, str]:
        return {name: "the echo engine serves no LoRA adapters" for name in adapters}

    def info(self) -> EngineInfo:
        # The echo counts whitespace-separated words (see _plan_chat).
        return EngineInfo(root=None, max_model_len=self._max_model_len, tokenizer={"kind": "words"})

    def num_unfinished_requests(self) -> int:
        return self._in_flight

    def metrics_text(self) -> str | None:
        return None

    async def check_health(self) -> None:
        return None

    def dead(self) -> bool:
        return False

    async def shutdown(self) -> None:
        return None

    def forget_response(self, response_id: str) -> None:
        self._stored.pop(response_id, None)

    async def complete(self, request: EngineRequest, tally: GenerationTally) -> bytes:
        return body_of(await self._answer(request, tally))

    async def stream(self, request: EngineRequest, tally: GenerationTally) -> AsyncIterator[bytes]:
        return frames_of(await self._answer(request, tally))

    async def _answer(self, request: EngineRequest, tally: GenerationTally) -> bytes | AsyncIterator[bytes]:
        """The body, or (``stream``) the events, that answer ``request``."""
        if request.endpoint in STORED:
            return self._kept(request)
        if request.endpoint == "responses":
            return await self._respond(request, tally)
        if request.endpoint == "responses_input_tokens":
            check_fields(request.endpoint, request.body, INPUT_TOKENS_FIELDS)
            check_input(request.body)  # as the vLLM engine refuses it
            req = _validated(responses.EchoResponsesRequest, request.body)
            return input_tokens_body(_words(responses.conversation(req, responses.previous_of(req, self._stored))))
        if request.endpoint in ("messages", "messages_count"):
            return self._message(request, tally)
        plan = self._plan(request)
        tally.prompt_tokens = plan.prompt_tokens
        if not request.stream:
            if self._token_delay_s and plan.completion_tokens:  # the whole answer's decode time
                self._in_flight += 1
                try:
                    await asyncio.sleep(self._token_delay_s * plan.completion_tokens)
                finally:
                    self._in_flight -= 1
            body = json.dumps(render.render(plan), separators=(",", ":")).encode()
            _all_tokens_now(tally, plan.completion_tokens)
            return body
        return self._stream(plan, tally)

    async def _stream(self, plan: render.EchoPlan, tally: GenerationTally) -> AsyncIterator[bytes]:
        self._in_flight += 1
        sent = 0
        try:
            for chunk in render.chunks(plan):
                if self._token_delay_s:
                    await asyncio.sleep(self._token_delay_s)
                sent += _carries_token(chunk)  # handed out: generated, whether or not the client stays
                yield sse.frame(chunk)
                tally.first_token()
            _streamed(tally, plan.completion_tokens)
            yield sse.DONE
        finally:
            self._in_flight -= 1
            _left_after(tally, sent)

    async def most_tokens(self, request: EngineRequest) -> int:
        if request.endpoint == "messages":
            req = _message_request(request.body)
            prompt = anthropic.prompt_words(req)
            budget = self._budget(prompt, req.max_tokens, "messages")
            return prompt + len(render.answer(anthropic.last_user_text(req), budget, req.stop_sequences).tokens)
        if request.endpoint in COUNTING:
            return 0
        if request.endpoint == "responses":
            _, turns, answer = self._response_plan(request)
            return _words(turns) + len(answer.tokens)
        plan = self._plan(request)  # the echo knows its answer, so this is exact
        return plan.prompt_tokens + plan.completion_tokens

    def _response_plan(
        self, request: EngineRequest
    ) -> tuple[responses.EchoResponsesRequest, list[responses.Turn], render.Answer]:
        check_input(request.body)
        check_openai_metadata(request.endpoint, request.body)  # as the vLLM engine bounds it
        req = _validated(responses.EchoResponsesRequest, request.body)
        turns = responses.conversation(req, responses.previous_of(req, self._stored))
        asked = [text for role, text in responses.turns_of(req.input) if role == "user"]
        budget = self._budget(_words(turns), req.max_output_tokens, "input", "max_output_tokens")
        return req, turns, render.answer(asked[-1] if asked else "", budget, None)

    async def _respond(self, request: EngineRequest, tally: GenerationTally) -> bytes | AsyncIterator[bytes]:
        """``POST /v1/responses``: the response, or its events; kept when ``store``."""
        req, turns, answer = self._response_plan(request)
        tally.prompt_tokens = _words(turns)
        text = "".join(answer.tokens)
        status: Literal["completed", "incomplete"] = "incomplete" if answer.finish_reason == "length" else "completed"
        usage = responses.usage(tally.prompt_tokens, len(answer.tokens))
        response_id = f"resp_{request.request_id}"
        final = responses.response_body(req, response_id, self._name, responses.now(), status, text, usage)
        # A follow-up's own instructions stand in for these, as OpenAI and vLLM take them.
        said = turns[1:] if req.instructions else turns
        kept = responses.Stored(final, [*said, ("assistant", text)]) if req.store else None
        if not req.stream:
            _all_tokens_now(tally, len(answer.tokens))
            if kept is not None:
                self._stored[response_id] = kept
            return json.dumps(final, separators=(",", ":")).encode()
        return self._response_events(final, answer.tokens, kept, tally)

    async def _response_events(
        self, final: dict[str, Any], tokens: list[str], kept: responses.Stored | None, tally: GenerationTally
    ) -> AsyncIterator[bytes]:
        delta = b"event: response.output_text.delta\n"
        async for event in self._named_events(responses.events(final, tokens), delta, len(tokens), tally):
            yield event
        if kept is not None:
            self._stored[final["id"]] = kept

    def _message(self, request: EngineRequest, tally: GenerationTally) -> bytes | AsyncIterator[bytes]:
        """Anthropic's ``POST /v1/messages`` (the message, or its events) and its ``count_tokens``."""
        if request.endpoint == "messages_count":
            check_prefill(request.body)  # as the vLLM engine refuses it
            count = anthropic.prompt_words(_validated(anthropic.EchoCountRequest, request.body))
            return json.dumps({"input_tokens": count}).encode()
        req = _message_request(request.body)
        prompt = tally.prompt_tokens = anthropic.prompt_words(req)
        answer = render.answer(anthropic.last_user_text(req), self._budget(prompt, req.max_tokens, "messages"), req.stop_sequences)
        stop = "max_tokens" if answer.finish_reason == "length" else "stop_sequence" if answer.stop else "end_turn"
        final = anthropic.message(
            f"msg_{request.request_id}", self._name, "".join(answer.tokens), stop, prompt, len(answer.tokens), answer.stop
        )
        if not req.stream:
            _all_tokens_now(tally, len(answer.tokens))
            return json.dumps(final, separators=(",", ":")).encode()
        return self._named_events(anthropic.events(final, answer.tokens), b"event: content_block_delta\n", len(answer.tokens), tally)

    async def _named_events(
        self, events: Any, token_event: bytes, tokens: int, tally: GenerationTally
    ) -> AsyncIterator[bytes]:
        """Sends ``events``, one token's delay before each that starts with ``token_event``."""
        self._in_flight += 1
        sent = 0
        try:
            for event in events:
                token = event.startswith(token_event)
                if token and self._token_delay_s:
                    await asyncio.sleep(self._token_delay_s)
                sent += token
                yield event
                if token:
                    tally.first_token()
            _streamed(tally, tokens)
        finally:
            self._in_flight -= 1
            _left_after(tally, sent)

    def _kept(self, request: EngineRequest) -> bytes:
        """A stored response (``responses_retrieve``), its deletion, or its
        cancellation, which only background responses allow: the echo runs none."""
        response_id = str(request.body.get("response_id"))
        kept = self._stored.get(response_id)
        if kept is None:
            raise ResponseNotFoundError.for_id(response_id, "response_id")
        if request.endpoint == "responses_delete":
            del self._stored[response_id]
            return deleted_body(response_id)
        if request.endpoint == "responses_cancel":
            raise not_cancellable(str(kept.body.get("status")), background=False)
        if request.body.get("stream"):
            raise not_streamable()
        return json.dumps(kept.body, separators=(",", ":")).encode()

    def _plan(self, request: EngineRequest) -> render.EchoPlan:
        if request.endpoint not in ("chat", "completion"):
            raise ModelNotSupportedError(
                f"The model `{self._name}` (an echo engine) does not serve {_path(request.endpoint)}.", param="model"
            )
        if request.endpoint == "chat":
            check_openai_metadata(request.endpoint, request.body)
            check_chat_messages(request.body)  # as the vLLM engine refuses them
            return self._plan_chat(_validated(ChatCompletionRequest, request.body), request.request_id)
        check_not_empty(request.body, "prompt")  # as the vLLM engine refuses it
        return self._plan_completion(_validated(CompletionRequest, request.body), request.request_id)

    def _plan_chat(self, req: ChatCompletionRequest, request_id: str) -> render.EchoPlan:
        texts = [render.text_of(m.content) for m in req.messages]
        prompt = sum(len(t.split()) for t in texts)
        user_texts = [render.text_of(m.content) for m in req.messages if m.role == "user"]
        reply = user_texts[-1] if user_texts else ""
        field = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        budget = self._budget(prompt, req.output_budget, "messages", field)
        answer = render.answer(reply, budget, req.stop)
        return render.EchoPlan(
            kind="chat",
            id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            model=self._name,
            prompt_tokens=prompt,
            answers=[answer] * (req.n or 1),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    def _plan_completion(self, req: CompletionRequest, request_id: str) -> render.EchoPlan:
        prompts = req.prompts()
        answers: list[render.Answer] = []
        prompt_tokens = 0
        for text in prompts:
            prompt = len(text.split())
            prompt_tokens += prompt
            budget = req.max_tokens if req.max_tokens is not None else COMPLETION_BUDGET  # (null: as vLLM takes it)
            answer = render.answer(text, self._budget(prompt, budget, "prompt"), req.stop)
            answers.extend([answer] * (req.n or 1))
        return render.EchoPlan(
            kind="completion",
            id=f"cmpl-{request_id}",
            created=int(time.time()),
            model=self._name,
            prompt_tokens=prompt_tokens,
            answers=answers,
            logprobs=req.logprobs,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    def _budget(self, prompt_tokens: int, requested: int | None, param: str, field: str = "max_tokens") -> int:
        """The answer's most tokens: ``requested`` (sent as ``field``) if the
        window holds it after the ``param``'s ``prompt_tokens``, else refused."""
        check_budget_fits(field, requested, self._max_model_len)
        if requested is None:
            if prompt_tokens >= self._max_model_len:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {self._max_model_len} tokens. "
                    f"However, your {param} contain {prompt_tokens} tokens. "
                    f"Please reduce the length of the {param}.",
                    param=param,
                )
            return self._max_model_len - prompt_tokens
        if prompt_tokens + requested > self._max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self._max_model_len} tokens. "
                f"However, you requested {prompt_tokens + requested} tokens "
                f"({prompt_tokens} in the {param}, {requested} in the completion). "
                f"Please reduce the length of the {param} or completion.",
                param=param,
            )
        return requested


_Schema = TypeVar("_Schema", bound=BaseModel)


def _message_request(body: dict[str, Any]) -> anthropic.EchoMessagesRequest:
    """A Messages API body, checked as the vLLM engine checks it: Anthropic's
    ``temperature`` range, no empty stop sequence, no prefill ending in whitespace."""
    req = _validated(anthropic.EchoMessagesRequest, body)
    check_prefill(body)
    check_sampling(req, req.max_tokens, ANTHROPIC_RANGES)
    return req


def _validated(schema: type[_Schema], body: dict[str, Any]) -> _Schema:
    if (wrong := check_scalars(schema, body)) is not None:  # pydantic's lax mode would convert it
        raise InvalidRequestError(wrong.message, param=wrong.param, code=wrong.code)
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequestError.from_validation(exc) from None


def _streamed(tally: GenerationTally, tokens: int) -> None:
    """A stream's ``tokens`` have all been sent: the gaps spread evenly after the first."""
    tally.completion_tokens = tokens
    if tokens > 1 and tally.first_token_s is not None:
        spread = time.time() - tally.started - tally.first_token_s
        tally.gaps(spread / (tokens - 1), tokens - 1)


def _carries_token(chunk: dict[str, Any]) -> int:
    """1 for a chunk that carries one of the answer's tokens (each does, at most one)."""
    return int(any(choice.get("text") or (choice.get("delta") or {}).get("content") for choice in chunk["choices"]))


def _left_after(tally: GenerationTally, sent: int) -> None:
    """A stream closed before its end (the client left) counts the tokens it sent,
    as vLLM counts what it generated before it was stopped."""
    if tally.completion_tokens < sent:
        _streamed(tally, sent)


def _words(turns: list[responses.Turn]) -> int:
    return sum(len(text.split()) for _, text in turns)


def _all_tokens_now(tally: GenerationTally, tokens: int) -> None:
    """Echo's tokens exist all at once: the first now, the rest no later."""
    tally.completion_tokens = tokens
    if tokens:
        tally.first_token()
        tally.gaps(0.0, tokens - 1)


def _path(endpoint: str) -> str:
    """Where a client sent a request for ``endpoint`` (one the echo engine does not serve)."""
    return f"/{endpoint}" if endpoint in ("tokenize", "detokenize") else f"/v1/{endpoint}"
