"""What the gateway relies on in the installed vLLM, by name: ``CONTRACT``
lists each function or class ``models.llm.vllm_compat`` reaches, with the
parameters the gateway passes; ``SCHEMA_FIELDS`` the request fields it sets
or reads; ``INSTANCE_FIELDS`` the attributes it reads off vLLM's serving
objects. ``check_contract`` verifies them (at engine start, and in the unit
tests), so an upgrade that moves one fails loudly, naming it, instead of
misbehaving at the first request."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

_RESPONSES = "vllm.entrypoints.openai.responses.serving"
_ANTHROPIC = "vllm.entrypoints.anthropic.serving"
_TOKENIZE = "vllm.entrypoints.serve.tokenize.serving"
_MODELS = "vllm.entrypoints.openai.models.serving"

# (module, attribute path, parameters the gateway passes by name or relies on).
CONTRACT: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.entrypoints.launchers.cli_args", "make_arg_parser", ()),
    ("vllm.utils.argparse_utils", "FlexibleArgumentParser", ()),
    ("vllm.engine.arg_utils", "AsyncEngineArgs.from_cli_args", ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.from_engine_args", ("usage_context",)),
    ("vllm.usage.usage_lib", "UsageContext.OPENAI_API_SERVER", ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.generate", ("prompt", "sampling_params")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.get_supported_tasks", ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.get_num_unfinished_requests", ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.check_health", ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.errored", ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.shutdown", ()),
    ("vllm.entrypoints.launchers.api_server.app_state", "init_app_state", ("engine_client", "state", "args")),
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat.render_chat_request", ("request",)),
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat.create_chat_completion", ("request",)),
    (
        "vllm.entrypoints.openai.completion.serving",
        "OpenAIServingCompletion.render_completion_request",
        ("request",),
    ),
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion.create_completion", ("request",)),
    (_RESPONSES, "OpenAIServingResponses.create_responses", ("request",)),
    (_RESPONSES, "OpenAIServingResponses._render_resolved_response_inputs", ("request", "prev_response")),
    ("vllm.entrypoints.openai.responses.utils", "construct_chat_messages_with_tool_call", ("input_messages",)),
    ("vllm.tool_parsers.utils", "flat_namespace_tool_name", ("namespace", "name")),
    (
        "vllm.renderers.online_renderer",
        "OnlineRenderer.render_responses",
        ("request", "previous_messages", "previous_response_outputs", "tool_server"),
    ),
    (_RESPONSES, "OpenAIServingResponses.retrieve_responses", ("response_id", "starting_after", "stream")),
    (_RESPONSES, "OpenAIServingResponses.cancel_responses", ("response_id",)),
    (_ANTHROPIC, "AnthropicServingMessages.create_messages", ("request",)),
    (_ANTHROPIC, "AnthropicServingMessages.count_tokens", ("request",)),
    (_TOKENIZE, "ServingTokenization.create_tokenize", ("request", "raw_request")),
    (_TOKENIZE, "ServingTokenization.create_detokenize", ("request", "raw_request")),
    (_ANTHROPIC, "AnthropicServingMessages.messages_full_converter", ("generator",)),
    (
        _ANTHROPIC,
        "AnthropicServingMessages.to_chat_completion_request",
        ("anthropic_request", "merge_inline_system", "disabled_thinking_effort"),
    ),
    (_ANTHROPIC, "AnthropicServingMessages._get_disabled_thinking_effort", ()),
    ("vllm.renderers.inputs.preprocess", "extract_prompt_len", ("model_config", "prompt")),
    ("vllm.renderers.chat_utils", "MM_PARSER_MAP", ()),  # the chat content part types vLLM reads
    (_MODELS, "OpenAIServingModels.load_lora_adapter", ("request",)),
    (_MODELS, "OpenAIServingModels.unload_lora_adapter", ("request",)),
    ("vllm.renderers.hf", "resolve_chat_template", ("tokenizer", "chat_template", "tools", "model_config")),
    (
        "vllm.renderers.hf",
        "resolve_chat_template_content_format",
        ("chat_template", "tools", "given_format", "tokenizer", "model_config"),
    ),
    ("vllm.sampling_params", "RequestOutputKind.DELTA", ()),
    # models.llm.one_node: a one-node engine's workers meet through a file.
    ("vllm.v1.executor.ray_executor_v2", "RayWorkerProc.create_dist_init_method", ()),
    ("vllm.utils.network_utils", "get_file_store_init_method", ()),
    ("vllm.utils.network_utils", "aiter_requires_tcp_store", ()),
    ("vllm.v1.executor.ray_executor", "get_distributed_init_method", ("ip", "port")),
    ("vllm.plugins", "DEFAULT_PLUGINS_GROUP", ()),
    ("vllm.v1.engine.exceptions", "EngineDeadError", ()),
    ("vllm.entrypoints.serve.exception_handling.error_response", "create_error_response", ("message",)),
    ("vllm.entrypoints.serve.engine.protocol", "ErrorResponse", ()),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", ()),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", ()),
    ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest", ()),
    ("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest", ()),
    ("vllm.entrypoints.anthropic.protocol", "AnthropicCountTokensRequest", ()),
    ("vllm.utils.mistral", "is_mistral_tokenizer", ("obj",)),
    ("vllm.parser.abstract_parser", "Parser.tool_parser_cls", ()),
)

# Request fields the gateway sets or reads, per vLLM request schema.
SCHEMA_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "vllm.entrypoints.openai.chat_completion.protocol",
        "ChatCompletionRequest",
        ("request_id", "max_tokens", "max_completion_tokens", "n", "add_generation_prompt", "continue_final_message"),
    ),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", ("request_id", "max_tokens", "n")),
    (
        "vllm.entrypoints.openai.responses.protocol",
        "ResponsesRequest",
        ("request_id", "background", "stream", "previous_response_id", "max_output_tokens"),
    ),
    ("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest", ("max_tokens",)),
    ("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest", ("lora_name", "lora_path", "load_inplace")),
    ("vllm.entrypoints.serve.lora.protocol", "UnloadLoRAAdapterRequest", ("lora_name",)),
    (
        "vllm.v1.metrics.stats",
        "RequestStateStats",
        ("arrival_time", "first_token_ts", "last_token_ts", "first_token_latency"),
    ),
)

# Attributes set in a constructor (module, class, names), read from its source.
INSTANCE_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (_RESPONSES, "OpenAIServingResponses", (
        "response_store", "msg_store", "event_store", "background_tasks", "tool_server", "online_renderer",
        "use_harmony",
    )),
    (_ANTHROPIC, "AnthropicServingMessages", ("_merge_inline_system",)),
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat", ("online_renderer",)),
    ("vllm.renderers.online_renderer", "OnlineRenderer", ("renderer", "parser", "use_harmony")),
    (_TOKENIZE, "ServingTokenization", ("renderer",)),
)

# Where ``init_app_state`` leaves each serving object, by the gateway's endpoint.
STATE_MODULE = "vllm.entrypoints.generate.api_router"  # sets them
STATE_NAMES = {
    "chat": "openai_serving_chat",
    "completion": "openai_serving_completion",
    "responses": "openai_serving_responses",
    "messages": "anthropic_serving_messages",
}


def check_contract() -> list[str]:
    """What the installed vLLM lacks of ``CONTRACT``, ``SCHEMA_FIELDS`` and
    ``INSTANCE_FIELDS``, one line each; empty when everything is there."""
    problems: list[str] = []
    for module_name, path, params in CONTRACT:
        target = _resolve(module_name, path, problems)
        if target is None or not params:
            continue
        try:
            accepted = inspect.signature(target).parameters
        except (TypeError, ValueError):
            problems.append(f"{module_name}.{path}: no signature to check")
            continue
        missing = [name for name in params if name not in accepted]
        if missing:
            problems.append(f"{module_name}.{path}: no parameter {', '.join(missing)}")
    for module_name, cls_name, names in SCHEMA_FIELDS:
        cls = _resolve(module_name, cls_name, problems)
        known = set(getattr(cls, "model_fields", None) or getattr(cls, "__dataclass_fields__", None) or ())
        missing = [name for name in names if cls is not None and name not in known]
        if missing:
            problems.append(f"{module_name}.{cls_name}: no field {', '.join(missing)}")
    for module_name, cls_name, names in INSTANCE_FIELDS:
        cls = _resolve(module_name, cls_name, problems)
        if cls is None:
            continue
        source = inspect.getsource(cls.__init__)
        missing = [name for name in names if f"self.{name} " not in source and f"self.{name}:" not in source]
        if missing:
            problems.append(f"{module_name}.{cls_name}.__init__ sets no {', '.join(missing)}")
    state_source = inspect.getsource(importlib.import_module(STATE_MODULE))
    for name in STATE_NAMES.values():
        if f"state.{name} =" not in state_source:
            problems.append(f"vLLM's app state has no {name}")
    return problems


def _resolve(module_name: str, path: str, problems: list[str]) -> Any:
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        problems.append(f"{module_name}: cannot be imported ({exc})")
        return None
    for part in path.split("."):
        if not hasattr(target, part):
            problems.append(f"{module_name}.{path}: no {part}")
            return None
        target = getattr(target, part)
    return target
