"""Every use of vLLM beyond its command line and request schemas: with
``models.llm.vllm_contract``, the place to read, and to change, on a vLLM
upgrade.

The gateway builds vLLM's serving layer as ``vllm serve`` does and reaches
past its HTTP routes in a few places: it hands the serving layer its engine
client through a wrapper (to count tokens and adjust sampling params), wraps
the render steps (to refuse prompts whose budget overflows the window before
anything is generated), reads prompt lengths and the Responses API's stores,
converts Anthropic requests to chat requests, and resolves chat templates for
the ingress's token counter. ``models.llm.vllm_contract`` lists each of
those names with the parameters the gateway passes, and verifies them
against the installed vLLM at engine start, so an upgrade that moves one
fails loudly, naming it, instead of misbehaving at the first request.

vLLM's errors become the gateway's here too, by type and by vLLM's own error
objects (``ERROR_TABLE``), never by the words of their messages.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import errors
from models.llm import vllm_conversation, vllm_errors, vllm_messages, vllm_streams
from models.llm.vllm_contract import STATE_NAMES, check_contract

logger = logging.getLogger(__name__)

# ``/tokenize`` of chat messages: its own schema (vLLM's server picks it the same way, by the body).
TOKENIZE_CHAT = "tokenize_chat"
# And the tokenizer routes' and the served models' (``init_app_state`` sets them itself).
TOKENIZATION_STATE = "serving_tokenization"
MODELS_STATE = "openai_serving_models"


@dataclass
class Serving:
    """vLLM's engine and its OpenAI and Anthropic serving objects, built as
    ``vllm serve`` builds them. ``endpoints`` maps each gateway endpoint the
    model serves to vLLM's request schema, its serving call and the request's
    prompt parameter (for errors)."""

    engine: Any
    model_config: Any
    max_model_len: int
    chat: Any = None
    completion: Any = None
    responses: Any = None
    messages: Any = None
    tokenization: Any = None
    models: Any = None  # the served names: the model's and its LoRA adapters' (``models.llm.vllm_lora``)
    endpoints: dict[str, tuple[Any, Callable[..., Awaitable[Any]], str]] = field(default_factory=dict)
    error_response: Any = type(None)  # vLLM's ErrorResponse, once started
    delta_kind: Any = None


class _EngineClient:
    """The engine as vLLM's serving layer sees it (its ``EngineClient``):
    everything passes through to AsyncLLM but ``generate``, which is
    ``generate`` as given. No vLLM code sets attributes on its engine client."""

    def __init__(self, engine: Any, generate: Callable[..., AsyncIterator[Any]]) -> None:
        self._engine = engine
        self.generate = generate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


async def build_serving(
    cli_args: list[str],
    wrap_generate: Callable[[Callable[..., AsyncIterator[Any]], Any], Callable[..., AsyncIterator[Any]]],
) -> Serving:
    """Starts vLLM's engine for the ``vllm serve`` command line ``cli_args``
    and builds its serving layer, which calls ``wrap_generate(engine.generate,
    RequestOutputKind.DELTA)`` instead of the engine's own ``generate``.
    Raises RuntimeError naming what is missing when the installed vLLM does
    not have what this module relies on."""
    problems = check_contract()
    if problems:
        raise RuntimeError("the installed vLLM is not the one the gateway was built for: " + "; ".join(problems))
    from starlette.datastructures import State
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    args = parse_cli_args(make_arg_parser(FlexibleArgumentParser()), cli_args)
    # As `vllm serve` starts it: vLLM picks its batch defaults (max-num-seqs,
    # max-num-batched-tokens) by this context, on a GPU 1024 sequences where
    # an engine of another context gets 128.
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs.from_cli_args(args), usage_context=UsageContext.OPENAI_API_SERVER
    )
    try:
        client: Any = _EngineClient(engine, wrap_generate(engine.generate, RequestOutputKind.DELTA))
        state = State()
        await init_app_state(client, state, args, await engine.get_supported_tasks())
        serving = Serving(
            engine=engine,
            model_config=engine.model_config,
            max_model_len=int(engine.model_config.max_model_len),
            error_response=ErrorResponse,
            delta_kind=RequestOutputKind.DELTA,
        )
        for endpoint, name in STATE_NAMES.items():
            setattr(serving, endpoint, getattr(state, name, None))
        serving.tokenization = getattr(state, TOKENIZATION_STATE, None)
        serving.models = getattr(state, MODELS_STATE, None)
        _register_endpoints(serving)
    except BaseException:  # (a tool parser the tokenizer cannot serve, say): its processes end now
        try:
            engine.shutdown()
        except Exception:  # noqa: BLE001 - the start's own error is the one to tell
            logger.exception("the engine did not shut down after its failed start")
        raise
    return serving


def parse_cli_args(parser: Any, cli_args: list[str]) -> Any:
    """``cli_args`` parsed by vLLM's ``parser``, whole flag names only: an
    abbreviation (``max-model``) would set what the gateway sets itself
    (``max-model-len``), past the config's check. An ``engine_args`` setting
    of false comes as ``--no-<flag>`` (``VLLMEngine.cli_args``): vLLM's own
    where it has one; a flag without one only turns something on, so false
    leaves it out; a flag vLLM does not have at all is refused either way."""
    parser.allow_abbrev = False
    known = parser._option_string_actions
    return parser.parse_args([arg for arg in cli_args if not _turns_nothing_off(arg, known)])


def _turns_nothing_off(arg: str, known: Any) -> bool:
    """``--no-<flag>`` of a vLLM flag that has no such form."""
    return arg.startswith("--no-") and arg not in known and "--" + arg.removeprefix("--no-") in known


def _register_endpoints(serving: Serving) -> None:
    from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )

    if serving.chat is not None:
        serving.endpoints["chat"] = (ChatCompletionRequest, serving.chat.create_chat_completion, "messages")
    if serving.completion is not None:
        serving.endpoints["completion"] = (CompletionRequest, serving.completion.create_completion, "prompt")
    if serving.responses is not None:
        serving.endpoints["responses"] = (ResponsesRequest, serving.responses.create_responses, "input")
        # Counted by rendering it (``render_response``), never created.
        serving.endpoints["responses_input_tokens"] = (ResponsesRequest, serving.responses.create_responses, "input")
    if serving.messages is not None:
        messages = serving.messages
        # A message's id is made from the request's, as a chat completion's is (``vllm_messages``).
        messages.to_chat_completion_request = vllm_messages.identified(messages.to_chat_completion_request)
        messages.messages_full_converter = vllm_errors.tool_inputs_checked(  # type: ignore[method-assign]
            vllm_messages.whole_identified(messages.messages_full_converter)
        )
        messages.message_stream_converter = vllm_streams.messages_converter(  # type: ignore[method-assign]
            messages.message_stream_converter, lambda: bool(serving.engine.errored), vllm_messages.start_identified
        )
        serving.endpoints["messages"] = (AnthropicMessagesRequest, messages.create_messages, "messages")
        serving.endpoints["messages_count"] = (AnthropicCountTokensRequest, messages.count_tokens, "messages")
    if serving.tokenization is not None:
        tokenization = serving.tokenization
        serving.endpoints["tokenize"] = (TokenizeCompletionRequest, tokenization.create_tokenize, "prompt")
        serving.endpoints[TOKENIZE_CHAT] = (TokenizeChatRequest, tokenization.create_tokenize, "messages")
        serving.endpoints["detokenize"] = (DetokenizeRequest, tokenization.create_detokenize, "tokens")


def prompt_len(serving: Serving, engine_input: Any) -> int:
    """The token count of one rendered prompt (an engine input)."""
    from vllm.renderers.inputs.preprocess import extract_prompt_len

    return int(extract_prompt_len(serving.model_config, engine_input))


async def render(serving: Serving, endpoint: str, parsed: Any) -> list[Any]:
    """The engine inputs ``parsed`` (a request of ``endpoint``: chat, messages
    or completion) renders to, as vLLM will render it to generate; raises
    ``errors.GatewayError`` where vLLM refuses it."""
    if endpoint == "messages":  # rendered as the chat request vLLM makes of it
        messages = serving.messages
        thinking = getattr(parsed, "thinking", None)
        # Disabled thinking takes the effort vLLM probed this model's template for, as it generates.
        effort = await messages._get_disabled_thinking_effort() if getattr(thinking, "type", None) == "disabled" else "none"
        parsed = messages.to_chat_completion_request(
            parsed, merge_inline_system=messages._merge_inline_system, disabled_thinking_effort=effort
        )
        result = await messages.render_chat_request(parsed)
    elif endpoint == "chat":
        result = await serving.chat.render_chat_request(parsed)
    else:
        result = await serving.completion.render_completion_request(parsed)
    if isinstance(result, serving.error_response):
        raise vllm_errors.map_error(result.model_dump())
    return list(result[1] if endpoint in ("chat", "messages") else result)


async def render_response(serving: Serving, parsed: Any) -> Any:
    """The engine input of a Responses API request, with the conversation of
    its ``previous_response_id``, as vLLM will render it."""
    responses = serving.responses
    previous = None
    if parsed.previous_response_id is not None:
        previous = responses.response_store.get(parsed.previous_response_id)
        if previous is None:
            raise errors.ResponseNotFoundError.for_id(parsed.previous_response_id, "previous_response_id")
    result = await responses._render_resolved_response_inputs(parsed, previous)
    if isinstance(result, serving.error_response):
        raise vllm_errors.map_error(result.model_dump())
    return result.engine_input


def guard_renders(
    serving: Serving, check: Callable[[str, Any, list[Any]], None], fits: Callable[[Any, Any], bool]
) -> None:
    """Has vLLM call ``check(endpoint, request, engine_inputs)`` each time it
    renders a request to generate from, before anything is generated; what
    ``check`` raises is what vLLM's serving call raises. A Responses request
    continuing a response that called tools, or with ``truncation: "auto"``
    (kept to what ``fits(request, engine_input)``), is rendered by
    ``models.llm.vllm_conversation``."""
    for endpoint in ("chat", "messages", "completion"):
        target = getattr(serving, endpoint)
        if target is None:
            continue
        attr = "render_completion_request" if endpoint == "completion" else "render_chat_request"
        setattr(target, attr, _checked(getattr(target, attr), endpoint, check))
    if serving.responses is not None:
        responses = serving.responses
        render_inputs = responses._render_resolved_response_inputs

        async def render_and_check(request: Any, previous: Any, **kwargs: Any) -> Any:
            if responses.use_harmony or not vllm_conversation.takes_over(request, previous):
                result = await render_inputs(request, previous, **kwargs)
            else:
                result = await vllm_conversation.render(
                    responses, request, previous, lambda tried: fits(request, tried.engine_input), **kwargs
                )
            if hasattr(result, "engine_input"):  # else an ErrorResponse: vLLM reports it
                check("responses", request, [result.engine_input])
            return result

        responses._render_resolved_response_inputs = render_and_check


def _checked(
    render_request: Callable[[Any], Awaitable[Any]], endpoint: str, check: Callable[[str, Any, list[Any]], None]
) -> Callable[[Any], Awaitable[Any]]:
    async def render_and_check(request: Any) -> Any:
        result = await render_request(request)
        if isinstance(result, (tuple, list)):  # else an ErrorResponse: vLLM reports it
            check(endpoint, request, list(result[1] if endpoint != "completion" else result))
        return result

    return render_and_check


def body_json(result: Any, endpoint: str) -> bytes:
    """A whole answer's body as vLLM's own server writes it for ``endpoint``:
    the Responses API's by its fields' aliases (a tool's ``async``, not
    ``async_``), Anthropic's shapes without what is unset (but a message's
    ``stop_sequence``, null, which Anthropic's always has)."""
    if endpoint.startswith("responses"):
        text: str = result.model_dump_json(by_alias=True)
    elif endpoint == "messages":
        return vllm_messages.whole_body(result.model_dump(mode="json", exclude_none=True))
    else:
        text = result.model_dump_json(exclude_none=endpoint.startswith("messages"))
    return text.encode()


def largest_token_id(serving: Serving) -> int | None:
    """The largest token id the model knows, as vLLM's renderer bounds a
    prompt's (the tokenizer's or the model's vocabulary, whichever is
    larger); None without a tokenizer."""
    tokenizer = serving.tokenization.renderer.tokenizer if serving.tokenization is not None else None
    if tokenizer is None:
        return None
    return max(int(tokenizer.max_token_id), int(serving.model_config.get_vocab_size()) - 1)


def calls_tools(serving: Serving) -> bool:
    """Whether the model makes tool calls, as vLLM's renderer decides it: with
    a tool-call parser, a Mistral tokenizer, or as a gpt-oss (harmony) model."""
    from vllm.utils.mistral import is_mistral_tokenizer

    renderer = serving.chat.online_renderer
    parser = renderer.parser
    if parser is not None and parser.tool_parser_cls is not None:
        return True
    return bool(renderer.use_harmony) or is_mistral_tokenizer(renderer.renderer.tokenizer)


def budgets_thinking(serving: Serving) -> bool:
    """Whether the engine keeps a request's thinking budget (vLLM's
    ``thinking_token_budget``): a reasoning parser set up its reasoning config."""
    config = getattr(getattr(serving.engine, "vllm_config", None), "reasoning_config", None)
    return config is not None and bool(config.enabled)


def tokenizer_spec(serving: Serving) -> dict[str, Any] | None:
    """How the ingress counts prompts as this engine does (``gateway.auth.prompt_count``):
    the tokenizer's ``tokenizer.json``, the chat templates vLLM resolves for
    requests with and without tools, the content formats it detects for them,
    and the special tokens transformers hands to the template."""
    from vllm.renderers.hf import resolve_chat_template, resolve_chat_template_content_format

    chat, model_config = serving.chat, serving.model_config
    tokenizer = chat.renderer.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # not a fast (tokenizers) tokenizer
    given = getattr(chat, "chat_template", None)
    option: Any = getattr(chat, "chat_template_content_format", "auto")
    templates: dict[str, str | None] = {}
    formats: dict[str, Any] = {}
    for key, tools in (("plain", None), ("tools", [])):
        templates[key] = resolve_chat_template(tokenizer, given, tools, model_config=model_config)
        formats[key] = resolve_chat_template_content_format(given, tools, option, tokenizer, model_config=model_config)
    renderer = getattr(chat, "online_renderer", None)
    formats["exclude_none"] = bool(getattr(renderer, "exclude_tools_when_tool_choice_none", False))
    return {
        "kind": "hf",
        "tokenizer": backend.to_str(),
        "chat_templates": templates,
        "content_formats": formats,
        "special_tokens": dict(tokenizer.special_tokens_map),
    }
