"""vLLM behind the gateway: AsyncLLM plus vLLM's own OpenAI serving layer.

The serving objects are built the way vLLM's ``api_server`` builds them
(``init_app_state``), so chat templates, tools, structured outputs, logprobs,
``n``, usage and stop handling behave exactly as under ``vllm serve``. This
module only adapts: request dicts in, bytes out, vLLM's errors into the
gateway's exception tree.

One deliberate difference from ``vllm serve``: a request whose prompt plus
``max_tokens`` exceeds the context window is refused (400
``context_length_exceeded``, as OpenAI does) instead of having its
``max_tokens`` quietly lowered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway import sse
from gateway.errors import (
    ContextLengthExceededError,
    GatewayError,
    InternalServerError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotSupportedError,
    NotImplementedFeatureError,
    ResponseNotFoundError,
    ServiceUnavailableError,
)
from models.llm import compact_json
from models.llm.engine import ENGINE_DEAD, EngineInfo

if TYPE_CHECKING:
    from gateway.config import ModelConfig
    from gateway.protocol.engine import EngineRequest
    from models.llm.tally import GenerationTally

logger = logging.getLogger(__name__)

# The tally of the request being handed to vLLM's serving layer: its calls to
# the engine's ``generate`` happen while it is set (see ``_tallied``).
_TALLY: ContextVar[GenerationTally | None] = ContextVar("tally", default=None)

_ERROR_PREFIX = b'data: {"error"'


class VLLMEngine:
    """Implements ``models.llm.engine.LLMEngine`` with vLLM's AsyncLLM."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._engine: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._responses: Any = None
        self._messages: Any = None
        self._max_model_len: int | None = None
        self._tokenizer_spec: dict[str, Any] | None = None
        # Per endpoint: vLLM's request schema, its serving call, the prompt's
        # param name for errors. Resolved once at start, not per request.
        self._endpoints: dict[str, tuple[Any, Any, str]] = {}
        self._error_response: Any = type(None)

    def cli_args(self) -> list[str]:
        """The ``vllm serve`` command line this engine is equivalent to."""
        c = self._config
        assert c.model is not None
        args = ["--model", c.model, "--served-model-name", c.name]
        args += ["--dtype", c.dtype, "--seed", str(c.seed)]
        args += ["--tensor-parallel-size", str(c.tensor_parallel_size)]
        args += ["--pipeline-parallel-size", str(c.pipeline_parallel_size)]
        if c.workers > 1:
            # Workers go on the bundles of the replica's own placement group.
            args += ["--distributed-executor-backend", "ray"]
        if c.max_model_len is not None:
            args += ["--max-model-len", str(c.max_model_len)]
        if c.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.tool_call_parser is not None:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", c.tool_call_parser]
        if compact_json.is_compact(c):
            args += compact_json.engine_args()
        for key, value in c.engine_args.items():
            if value is True:
                args.append(f"--{key}")
            elif value is not False:
                args += [f"--{key}", str(value)]
        return args

    async def start(self) -> None:
        if self._config.kv_cache_space_gib is not None:
            # vLLM's CPU backend reads its KV-cache size only from here.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self._config.kv_cache_space_gib)
        # vLLM's Responses API keeps responses (``store``) only when asked here;
        # the replica bounds how many (``models.llm.stored``).
        os.environ["VLLM_ENABLE_RESPONSES_API_STORE"] = "1" if self._config.kept_responses > 0 else "0"
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(self.cli_args())
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args))
        # The serving layer calls ``engine_client.generate`` per prompt.
        from vllm.sampling_params import RequestOutputKind

        prepare = compact_json.compact_structural_tag if compact_json.is_compact(self._config) else None
        self._engine.generate = _tallied(self._engine.generate, RequestOutputKind.DELTA, prepare)
        state = State()
        await init_app_state(self._engine, state, args, await self._engine.get_supported_tasks())
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._responses = getattr(state, "openai_serving_responses", None)
        self._messages = getattr(state, "anthropic_serving_messages", None)
        self._max_model_len = self._engine.model_config.max_model_len
        self._guard_context_length()
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        self._error_response = ErrorResponse
        if self._chat is not None:
            self._endpoints["chat"] = (ChatCompletionRequest, self._chat.create_chat_completion, "messages")
        if self._completion is not None:
            self._endpoints["completion"] = (
                CompletionRequest,
                self._completion.create_completion,
                "prompt",
            )
        if self._responses is not None:
            self._endpoints["responses"] = (ResponsesRequest, self._responses.create_responses, "input")
        if self._messages is not None:
            from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest

            messages = self._messages
            self._endpoints["messages"] = (AnthropicMessagesRequest, messages.create_messages, "messages")
            self._endpoints["messages_count"] = (AnthropicCountTokensRequest, messages.count_tokens, "messages")

    def info(self) -> EngineInfo:
        if self._tokenizer_spec is None and self._chat is not None:
            try:
                self._tokenizer_spec = _tokenizer_spec(self._chat, self._engine.model_config)
            except Exception:  # noqa: BLE001 - the ingress then asks this replica to count
                logger.warning("%s: no tokenizer description for the ingress", self._config.name, exc_info=True)
                self._tokenizer_spec = {}
        return EngineInfo(
            root=self._config.model, max_model_len=self._max_model_len, tokenizer=self._tokenizer_spec or None
        )

    def num_unfinished_requests(self) -> int:
        return int(self._engine.get_num_unfinished_requests())

    def metrics_text(self) -> str | None:
        """vLLM's Prometheus metrics (``vllm:*``), as ``vllm serve`` shows them at /metrics."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def check_health(self) -> None:
        await self._engine.check_health()

    def dead(self) -> bool:
        # AsyncLLM's monitor thread sets this the moment an engine-core process exits.
        return self._engine is not None and bool(self._engine.errored)

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()

    def forget_response(self, response_id: str) -> None:
        serving = self._responses
        if serving is not None:
            for store in (serving.response_store, serving.msg_store, serving.event_store):
                store.pop(response_id, None)

    async def generate(
        self, request: EngineRequest, tally: GenerationTally
    ) -> bytes | AsyncIterator[bytes]:
        if request.endpoint in ("responses_retrieve", "responses_cancel"):
            return await self._stored(request, tally)
        token = _TALLY.set(tally)
        try:
            parsed, result = await self._served(request, lambda parsed, create: create(parsed, None))
        finally:
            _TALLY.reset(token)
        if request.endpoint == "responses" and parsed.background:
            # vLLM generates in a task of its own, begun with this tally set:
            # the tally is complete once that task is done.
            task = tally.continues = self._responses.background_tasks.get(parsed.request_id)
            # Its events are read from where that task puts them, once it has begun.
            while parsed.stream and task is not None and not task.done():
                if parsed.request_id in self._responses.event_store:
                    break
                await asyncio.sleep(0)
        if hasattr(result, "model_dump_json"):
            # Anthropic's shapes leave out what is unset, as vLLM's own server sends them.
            return result.model_dump_json(exclude_none=request.endpoint.startswith("messages")).encode()
        if request.endpoint == "responses":
            return _events(result, tally)
        if request.endpoint == "messages":
            return _named_events(result, tally)
        return _frames(result, self.dead, tally)

    async def _stored(self, request: EngineRequest, tally: GenerationTally) -> bytes | AsyncIterator[bytes]:
        """A stored response (``GET /v1/responses/{id}``; with ``stream``, a
        background response's events from ``starting_after`` on), or one cancelled."""
        serving = self._responses
        if serving is None:
            raise ModelNotSupportedError(
                f"The model `{self._config.name}` does not serve the Responses API.", param="model"
            )
        body = request.body
        response_id = str(body["response_id"])
        try:
            if request.endpoint == "responses_cancel":
                result = await serving.cancel_responses(response_id)
            else:
                result = await serving.retrieve_responses(
                    response_id, body.get("starting_after"), bool(body.get("stream"))
                )
        except Exception as exc:  # noqa: BLE001 - vLLM's refusals, as it reports them
            raise translate_exception(exc, "response_id") from None
        if isinstance(result, self._error_response):
            raise translate_error(result.model_dump(), "response_id")
        if hasattr(result, "model_dump_json"):
            return result.model_dump_json().encode()
        return _events(result, tally)

    async def _served(
        self, request: EngineRequest, call: Callable[[Any, Any], Awaitable[Any]]
    ) -> tuple[Any, Any]:
        """Validates ``request`` with vLLM's schema and awaits ``call(parsed,
        create)``; vLLM's errors come back as GatewayError. Returns the parsed
        request and the result."""
        endpoint = self._endpoints.get(request.endpoint)
        if endpoint is None:
            raise ModelNotSupportedError(
                f"The model `{self._config.name}` does not serve this endpoint.", param="model"
            )
        schema, create, prompt_param = endpoint
        try:
            parsed = schema.model_validate(_with_request_id(request))
            result = await call(parsed, create)
        except GatewayError:
            raise
        except ValidationError as exc:
            raise InvalidRequestError.from_validation(exc) from None
        except Exception as exc:  # vLLM signals client mistakes with exceptions too
            raise translate_exception(exc, prompt_param) from None
        if isinstance(result, self._error_response):
            raise translate_error(result.model_dump(), prompt_param)
        return parsed, result

    async def most_tokens(self, request: EngineRequest) -> int:
        """Renders the request as vLLM will (chat template, tokenizer) without
        generating: each prompt's tokens plus ``n`` times its output budget
        (``max_completion_tokens`` / ``max_tokens``, else the rest of the window)."""
        if request.endpoint == "responses":
            return await self._most_response_tokens(request)
        if request.endpoint == "messages_count":
            return 0
        chat = request.endpoint in ("chat", "messages")
        serving = {"chat": self._chat, "messages": self._messages}.get(request.endpoint, self._completion)

        async def render(parsed: Any, create: Any) -> Any:
            if request.endpoint == "messages":  # rendered as the chat request vLLM makes of it
                parsed = serving.to_chat_completion_request(parsed, merge_inline_system=serving._merge_inline_system)
            if chat:
                return await serving.render_chat_request(parsed)
            return await serving.render_completion_request(parsed)

        parsed, result = await self._served(request, render)
        inputs = result[1] if chat else result
        budget = getattr(parsed, "max_completion_tokens", None) or parsed.max_tokens
        choices = getattr(parsed, "n", None) or 1
        assert self._max_model_len is not None
        total = 0
        for engine_input in inputs:
            prompt = serving._extract_prompt_len(engine_input)
            total += prompt + choices * (budget if budget is not None else self._max_model_len - prompt)
        return int(total)

    async def _most_response_tokens(self, request: EngineRequest) -> int:
        """A Responses API request's prompt, rendered as vLLM will, plus its
        ``max_output_tokens`` (else the rest of the window)."""
        serving = self._responses

        async def render(parsed: Any, create: Any) -> Any:
            previous = None
            if parsed.previous_response_id is not None:  # its conversation is part of the prompt
                previous = serving.response_store.get(parsed.previous_response_id)
                if previous is None:
                    raise ResponseNotFoundError.for_id(parsed.previous_response_id, "previous_response_id")
            return await serving._render_resolved_response_inputs(parsed, previous)

        parsed, result = await self._served(request, render)
        assert self._max_model_len is not None
        prompt = int(serving._extract_prompt_len(result.engine_input))
        budget = parsed.max_output_tokens
        return prompt + (budget if budget is not None else self._max_model_len - prompt)

    def _guard_context_length(self) -> None:
        """Refuses prompt + max_tokens beyond the context before anything is generated.

        The check wraps vLLM's render step, where the prompt's token count is
        first known, so streams fail before their first byte.
        """
        assert self._max_model_len is not None
        limit = self._max_model_len
        for serving, param in ((self._chat, "messages"), (self._messages, "messages"), (self._completion, "prompt")):
            if serving is None:
                continue
            attr = "render_chat_request" if param == "messages" else "render_completion_request"
            setattr(serving, attr, _guarded(getattr(serving, attr), serving, limit, param))
        if self._responses is not None:
            serving = self._responses
            render = serving._render_resolved_response_inputs

            async def render_and_check(request: Any, *args: Any, **kwargs: Any) -> Any:
                result = await render(request, *args, **kwargs)
                budget = request.max_output_tokens
                if budget is None or not hasattr(result, "engine_input"):
                    return result  # no budget asked for, or an ErrorResponse: vLLM reports it
                _check_window(serving._extract_prompt_len(result.engine_input), budget, limit, "input")
                return result

            serving._render_resolved_response_inputs = render_and_check


def _tokenizer_spec(serving: Any, model_config: Any) -> dict[str, Any] | None:
    """How the ingress counts prompts as this engine does (``gateway.auth.prompt_count``):
    the tokenizer's ``tokenizer.json``, the chat templates vLLM resolves for
    requests with and without tools, the content formats it detects for them,
    and the special tokens transformers hands to the template."""
    from vllm.renderers.hf import resolve_chat_template, resolve_chat_template_content_format

    tokenizer = serving.renderer.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # not a fast (tokenizers) tokenizer
    given = getattr(serving, "chat_template", None)
    option: Any = getattr(serving, "chat_template_content_format", "auto")
    templates: dict[str, str | None] = {}
    formats: dict[str, Any] = {}
    for key, tools in (("plain", None), ("tools", [])):
        templates[key] = resolve_chat_template(tokenizer, given, tools, model_config=model_config)
        formats[key] = resolve_chat_template_content_format(
            given, tools, option, tokenizer, model_config=model_config
        )
    renderer = getattr(serving, "online_renderer", None)
    formats["exclude_none"] = bool(getattr(renderer, "exclude_tools_when_tool_choice_none", False))
    return {
        "kind": "hf",
        "tokenizer": backend.to_str(),
        "chat_templates": templates,
        "content_formats": formats,
        "special_tokens": dict(tokenizer.special_tokens_map),
    }


def _guarded(
    render: Callable[[Any], Awaitable[Any]], serving: Any, limit: int, param: str
) -> Callable[[Any], Awaitable[Any]]:
    async def render_and_check(request: Any) -> Any:
        result = await render(request)
        if not isinstance(result, (tuple, list)):
            return result  # an ErrorResponse: vLLM reports it
        inputs = result[1] if param == "messages" else result
        budget = getattr(request, "max_completion_tokens", None) or request.max_tokens
        if budget is None:
            return result
        for engine_input in inputs:
            _check_window(serving._extract_prompt_len(engine_input), budget, limit, param)
        return result

    return render_and_check


def _check_window(prompt: int, budget: int, limit: int, param: str) -> None:
    if prompt + budget > limit:
        output = "output" if param == "input" else "completion"
        raise ContextLengthExceededError(
            f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {prompt + budget} tokens ({prompt} in the {param}, {budget} "
            f"in the {output}). Please reduce the length of the {param} or {output}.",
            param=param,
        )


def _tallied(
    generate: Callable[..., AsyncIterator[Any]],
    delta_kind: Any,
    prepare: Callable[[Any], None] | None = None,
) -> Callable[..., AsyncIterator[Any]]:
    """``AsyncLLM.generate``, counting into the tally of the request being served;
    ``delta_kind`` is vLLM's ``RequestOutputKind.DELTA``; ``prepare``, when given,
    may adjust each request's sampling params before the engine sees them."""

    def generate_and_count(prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        if prepare is not None:
            prepare(sampling_params)
        outputs = generate(prompt, sampling_params, *args, **kwargs)
        tally = _TALLY.get()
        if tally is None:
            return outputs
        delta = getattr(sampling_params, "output_kind", None) == delta_kind
        return _count(outputs, tally, delta)

    return generate_and_count


async def _count(outputs: AsyncIterator[Any], tally: GenerationTally, delta: bool) -> AsyncIterator[Any]:
    """Passes vLLM's ``RequestOutput``s through, adding their tokens and timings to ``tally``.

    Token times come from vLLM's request stats (engine-core timestamps) when
    it keeps them, else from arrival here. A final-only output spreads its
    tokens evenly between the first and the last token's times.
    """
    cumulative: dict[int, int] = {}  # per sequence, for outputs that repeat earlier tokens
    seen = 0
    last_ts: float | None = None
    first = True
    try:
        async for output in outputs:
            if first:
                tally.prompt_tokens += len(output.prompt_token_ids or ())
                first = False
            new = 0
            for seq in output.outputs:
                n = len(seq.token_ids)
                if not delta:
                    n, cumulative[seq.index] = n - cumulative.get(seq.index, 0), n
                new += n
            if new > 0:
                seen += new
                last_ts = _time_tokens(tally, output.metrics, new, last_ts)
            yield output
    finally:
        tally.completion_tokens += seen
        if hasattr(outputs, "aclose"):
            await outputs.aclose()  # aborts the engine request if we stopped early


def _time_tokens(
    tally: GenerationTally, stats: Any, new: int, last_ts: float | None
) -> float:
    """Records the timings of ``new`` tokens; returns the latest token's (monotonic) time."""
    now = time.monotonic()
    latest = float(stats.last_token_ts if stats is not None and stats.last_token_ts else now)
    if last_ts is not None:
        tally.gaps((latest - last_ts) / new, new)
        return latest
    first_at, first_ts = time.time(), now
    if stats is not None and stats.first_token_ts:
        first_at = stats.arrival_time + stats.first_token_latency
        first_ts = stats.first_token_ts
    tally.first_token(first_at)
    tally.gaps((latest - first_ts) / max(new - 1, 1), new - 1)
    return latest


def _with_request_id(request: EngineRequest) -> dict[str, Any]:
    """The body with vLLM's ``request_id`` (its engine request's id): the
    gateway's request id; for the Responses API it is also the response's
    ``id``, so it gets OpenAI's ``resp_`` prefix and the gateway's id wins."""
    if request.endpoint == "responses":
        return {**request.body, "request_id": f"resp_{request.request_id}"}
    return {"request_id": request.request_id, **request.body}


async def _events(stream: AsyncIterator[Any], tally: GenerationTally) -> AsyncIterator[bytes]:
    """vLLM's Responses API events as OpenAI sends them (``event:`` and
    ``data:`` lines, no ``[DONE]``). A failure after the first event ends the
    stream with an ``error`` event numbered after the last one.

    vLLM asks its engine for tokens only once the stream is read: the tally
    is set here, in the context of the task that reads it (its own, per
    stream), not only while the stream was being made."""
    _TALLY.set(tally)
    sequence = -1
    try:
        async for event in stream:
            sequence = getattr(event, "sequence_number", sequence)
            if event.type == "error":  # vLLM's own error event
                tally.failed(getattr(event, "code", None), 500)
            data = event.model_dump_json(indent=None, by_alias=True).encode()
            yield b"event: " + event.type.encode() + b"\ndata: " + data + b"\n\n"
    except Exception as exc:  # noqa: BLE001 - vLLM's failures mid-stream, as it reports them
        error = exc if isinstance(exc, GatewayError) else translate_exception(exc, "input")
        tally.failed(error.code, error.status_code)
        yield sse.responses_error_event(error.to_dict(), sequence + 1)


async def _named_events(stream: AsyncIterator[str], tally: GenerationTally) -> AsyncIterator[bytes]:
    """vLLM's Anthropic Messages events (``event:`` and ``data:`` lines, ready
    made, its own ``error`` event included, which ``tally`` records), as bytes."""
    async for text in stream:
        if text.startswith("event: error\n"):
            kind = str(json.loads(text.split("data: ", 1)[1]).get("error", {}).get("type", "api_error"))
            tally.failed(kind, 400 if kind == "invalid_request_error" else 500)
        yield text.encode()


async def _frames(
    stream: AsyncIterator[str], dead: Callable[[], bool] = lambda: False, tally: GenerationTally | None = None
) -> AsyncIterator[bytes]:
    """vLLM's SSE strings as bytes, its error frames put in the gateway's shape
    (and recorded in ``tally``); one that comes as the engine dies (``dead``)
    says so: 503, retry shortly."""
    async for text in stream:
        frame = text.encode()
        if frame.startswith(_ERROR_PREFIX):
            envelope = json.loads(frame[len(b"data: ") :])
            error = ServiceUnavailableError(ENGINE_DEAD) if dead() else translate_error(envelope)
            if tally is not None:
                tally.failed(error.code, error.status_code)
            yield sse.frame(error.to_dict())
            continue
        yield frame


def translate_error(envelope: dict[str, Any], prompt_param: str | None = None) -> GatewayError:
    """vLLM's ``{"error": {..., "code": <http status>}}`` as a gateway error.

    Context-length errors name ``prompt_param`` (``messages`` or ``prompt``), as
    OpenAI's do, rather than vLLM's internal parameter names.
    """
    error = envelope.get("error", envelope)
    status = int(error.get("code") or 500)
    message = str(error.get("message") or "")
    param = error.get("param")
    if status == 404 and param == "response_id":
        return ResponseNotFoundError(message, param=param)
    if status == 404 and "model" in message.lower():
        return ModelNotFoundError(message, param="model")
    if status == 400 and _is_context_length(message):
        return ContextLengthExceededError(message, param=prompt_param or param)
    if 400 <= status < 500:
        return InvalidRequestError(message, param=param, status=status)
    if status == 501:
        return NotImplementedFeatureError(message)
    if status == 503:
        return ServiceUnavailableError(message)
    logger.error("engine error: %s", message)
    return InternalServerError("The model failed while serving the request.")


def translate_exception(exc: Exception, prompt_param: str | None = None) -> GatewayError:
    """An exception from vLLM's serving layer, mapped the way vLLM's server maps
    it, except that a dead engine is 503: the replica is about to be replaced."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError(ENGINE_DEAD)

    response = create_error_response(exc)
    if response.error.code >= 500:
        logger.exception("engine failure", exc_info=exc)
    return translate_error(response.model_dump(), prompt_param)


def _is_context_length(message: str) -> bool:
    text = message.lower()
    return "context length" in text or "max_model_len" in text
