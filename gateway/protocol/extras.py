"""Request fields an engine's schema does not know: refused, or taken as hints.

vLLM's request models accept any field they do not know and drop it (one
debug log line): a misspelt ``max_token`` or ``temprature`` would change
nothing, and ``guided_json`` (removed from vLLM) would leave the output
unconstrained, all answered 200. The gateway answers as OpenAI and Anthropic
do: 400 naming the field. Fields that OpenAI's or Anthropic's API defines and
vLLM does not are refused when they ask for something the engine does not do
(``audio``, ``functions``, ``conversation``...), and accepted where they do not
change the answer (``metadata``, ``prompt_cache_key``, ``service_tier``...):
the answer is then the one the client asked for. The README lists both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from gateway.errors import InvalidRequestError
from gateway.validation import check_metadata

# A hint, and the values of it (in the request ``body``) that ask for nothing
# more than the answer (None: any value).
Hint = Callable[[Any, Mapping[str, Any]], bool] | None


def _false(value: Any, body: Mapping[str, Any]) -> bool:
    return value is False or value is None


def _text_only(value: Any, body: Mapping[str, Any]) -> bool:
    return value is None or value == ["text"]


def _medium(value: Any, body: Mapping[str, Any]) -> bool:
    """A ``verbosity`` that asks for OpenAI's default."""
    return value is None or value == "medium"


def _best_of_n(value: Any, body: Mapping[str, Any]) -> bool:
    """A completion's ``best_of`` that picks from no more than the ``n`` answers returned."""
    n = body.get("n")
    return value is None or (type(value) is int and value == (1 if n is None else n))


def _fewer_than_n(best_of: Any, n: Any) -> bool:
    """Whether a completion's ``best_of`` would pick from fewer answers than the ``n`` it returns."""
    whole = [type(value) is int for value in (best_of, 1 if n is None else n)]
    return all(whole) and best_of < (1 if n is None else n)


# OpenAI's and Anthropic's fields that do not change the answer, by endpoint.
HINTS: Mapping[str, Mapping[str, Hint]] = {
    "chat": {
        "metadata": None,  # tags for OpenAI's dashboard
        "service_tier": None,  # OpenAI's processing tier and price
        "prompt_cache_key": None,  # vLLM caches prefixes by itself
        "prompt_cache_retention": None,
        "prompt_cache_options": None,
        "safety_identifier": None,  # an id for OpenAI's abuse monitoring
        "prediction": None,  # predicted output: a latency hint, the answer is the same
        "store": _false,  # storing completions for later retrieval is not served
        "modalities": _text_only,
        "verbosity": _medium,  # OpenAI's default; another is unsupported, below
    },
    "completion": {"best_of": _best_of_n},  # beyond ``n``: unsupported, below
    # The A/B cohort the ingress routed by, as chat's and completions' ``user``:
    # the counts come from the variant the user's generations do.
    "tokenize": {"user": None},
    "detokenize": {"user": None},
    "responses": {
        "prompt_cache_retention": None,
        "prompt_cache_options": None,
        "safety_identifier": None,
        "stream_options": None,  # `include_obfuscation`: padding of stream events
    },
    "messages": {
        "cache_control": None,  # vLLM caches prefixes by itself
        "service_tier": None,
        "inference_geo": None,
        "speed": None,
        "workspace_id": None,
        "user_profile_id": None,
        "diagnostics": None,
    },
    "messages_count": {
        "cache_control": None,
        "speed": None,
        "workspace_id": None,
        "user_profile_id": None,
    },
}

# OpenAI's and Anthropic's fields that ask for what the engine does not do.
UNSUPPORTED: Mapping[str, Mapping[str, str]] = {
    "chat": {
        "audio": "audio output",
        "modalities": "output other than text",
        "web_search_options": "web search",
        "functions": "the deprecated function calling; use `tools`",
        "function_call": "the deprecated function calling; use `tool_choice`",
        "moderation": "moderation",
        "verbosity": "verbosity",
        "store": "stored chat completions",
    },
    "completion": {"best_of": "`best_of` above `n`; use `n`"},
    "responses": {
        "conversation": "conversations; use `previous_response_id`",
        "context_management": "context management",
        "background_options": "background options",
        "access_programs": "access programs",
        "image": "image generation",
        "moderation": "moderation",
    },
    "messages": {"container": "containers"},
    "responses_input_tokens": {
        "conversation": "conversations; use `previous_response_id`",
        "personality": "personality presets",
    },
}

# vLLM's fields for disaggregated serving (a prefill and a decode server
# sharing the KV or encoder cache), which the gateway does not deploy: vLLM
# takes the prompt from ``kv_transfer_params.prompt_token_ids`` instead of the
# request's messages, and passes a Messages request with ``do_remote_decode``
# over its budget checks.
DISAGGREGATED: Mapping[str, str] = {
    "kv_transfer_params": "disaggregated prefill and decode (KV cache transfer)",
    "ec_transfer_params": "disaggregated encoding (encoder cache transfer)",
}

# The only fields of a Responses request that ``POST /v1/responses/input_tokens``
# takes (OpenAI's; vLLM's ``chat_template_kwargs`` change the rendering, so
# they count too): what would only shape the answer is not counted, so it is
# refused rather than silently ignored.
INPUT_TOKENS_FIELDS = frozenset(
    {
        "model", "input", "instructions", "previous_response_id", "tools", "tool_choice",
        "parallel_tool_calls", "reasoning", "text", "truncation", "chat_template_kwargs",
    }
)


def counted_fields(endpoint: str, known: frozenset[str]) -> frozenset[str]:
    """The fields of an engine's schema (``known``) a request of ``endpoint`` may send."""
    return known & INPUT_TOKENS_FIELDS if endpoint == "responses_input_tokens" else known


# Fields vLLM once had and now ignores.
REMOVED: Mapping[str, str] = {
    "guided_json": "`response_format` with a `json_schema`, or `structured_outputs.json`",
    "guided_regex": "`structured_outputs.regex`",
    "guided_choice": "`structured_outputs.choice`",
    "guided_grammar": "`structured_outputs.grammar`",
    "guided_decoding_backend": "the server's structured outputs backend",
    "guided_whitespace_pattern": "`structured_outputs.whitespace_pattern`",
}


def check_fields(endpoint: str, body: Mapping[str, Any], known: Collection[str]) -> None:
    """Refuses (400, naming it) a field of ``body`` that is neither ``known`` to
    the engine's schema nor a hint the endpoint accepts."""
    hints = HINTS.get(endpoint, {})
    # (Where the schema does not know them, they are refused as any unknown field.)
    disaggregated = {name: what for name, what in DISAGGREGATED.items() if name in body and name in known}
    unsupported_here = {**UNSUPPORTED.get(endpoint, {}), **disaggregated}
    for name in sorted((body.keys() - known) | disaggregated.keys()):
        if name in hints:
            accepts = hints[name]
            if accepts is None or accepts(body[name], body):
                continue
        if body[name] is None and (name in REMOVED or name in unsupported_here):
            continue  # null: not asked for, as OpenAI takes it
        if name in REMOVED:
            raise InvalidRequestError(
                f"'{name}' is no longer supported and would be ignored, leaving the output "
                f"unconstrained; use {REMOVED[name]} instead.",
                param=name,
                code="unsupported_parameter",
            )
        if name == "best_of" and endpoint == "completion" and _fewer_than_n(body[name], body.get("n")):
            raise InvalidRequestError(
                f"Invalid 'best_of': {body[name]} is fewer than 'n' ({body.get('n')}); "
                "best_of must be greater than or equal to n.",
                param="best_of",
                code="invalid_value",
            )
        unsupported = unsupported_here.get(name)
        if unsupported is not None:
            raise InvalidRequestError(
                f"Unsupported parameter: '{name}': this model does not serve {unsupported}.",
                param=name,
                code="unsupported_parameter",
            )
        if endpoint.startswith("responses"):  # OpenAI's Responses API words it so, with a code
            raise InvalidRequestError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
        if endpoint.startswith("messages"):  # as Anthropic's API words it
            raise InvalidRequestError(f"{name}: Extra inputs are not permitted", param=name)
        raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)


# The endpoints whose ``metadata`` is OpenAI's (Anthropic's is ``{"user_id": ...}``).
_METADATA = ("chat", "responses")


def check_openai_metadata(endpoint: str, body: Mapping[str, Any]) -> None:
    """Refuses (400, in OpenAI's words) a chat or Responses ``metadata`` beyond
    OpenAI's bounds (16 string values, keys up to 64 characters, values up to
    512), which vLLM takes or drops whatever it is."""
    if endpoint in _METADATA and (wrong := check_metadata(body)) is not None:
        raise InvalidRequestError(wrong.message, param=wrong.param, code=wrong.code)
