"""Output-budget checks on a vLLM-parsed request: the budget field the
client named, its least value, logprobs per token, and prompt plus budget
against the context window. vLLM names its own fields (``max_tokens``,
``logprobs``) whichever the client sent, and quietly lowers a budget beyond
the window; these name the client's field and refuse as OpenAI does."""

from __future__ import annotations

from typing import Any

from gateway.errors import ContextLengthExceededError, InvalidRequestError

# The endpoints whose requests name an output budget.
GENERATING = frozenset({"chat", "completion", "responses", "messages"})


def budget(endpoint: str, request: Any) -> int | None:
    """The most tokens a (vLLM-parsed) request may generate per choice; None: the window's rest."""
    return budget_field(endpoint, request)[1]


def budget_field(endpoint: str, request: Any) -> tuple[str, int | None]:
    """The field that sets a request's output budget, as the client named it, and its value."""
    if endpoint == "responses":
        return "max_output_tokens", request.max_output_tokens
    if getattr(request, "max_completion_tokens", None) is not None:
        return "max_completion_tokens", request.max_completion_tokens
    return "max_tokens", request.max_tokens


def check_budget(endpoint: str, request: Any) -> None:
    """Refuses an output budget under one token, naming the field the client
    set (vLLM names its own ``max_tokens`` whichever it was); a completion
    that echoes its prompt may generate none (the prompt's logprobs alone, a
    scoring request, as OpenAI's completions API and vLLM's own server allow)."""
    field, budget = budget_field(endpoint, request)
    least = 0 if endpoint == "completion" and getattr(request, "echo", False) else 1
    if budget is not None and budget < least:
        raise InvalidRequestError(
            f"Invalid '{field}': integer below minimum value. Expected a value >= {least}, but got {budget} instead.",
            param=field,
            code="integer_below_min_value",
        )


def check_thinking(endpoint: str, request: Any, model: str, budgets_thinking: bool) -> None:
    """Refuses (400, ``unsupported_parameter``) a thinking budget asked of a
    model whose engine cannot keep one (``budgets_thinking`` False: no
    reasoning parser): a Messages ``thinking`` of type ``enabled``, chat's or
    a completion's ``thinking_token_budget``. vLLM refused it as it generated,
    in its command line's words (``Please set --reasoning-parser``), naming
    ``thinking_token_budget`` to a Messages client that never sent it."""
    if budgets_thinking:
        return
    if endpoint == "messages":
        if getattr(getattr(request, "thinking", None), "type", None) != "enabled":
            return
        field = "thinking"
    elif getattr(request, "thinking_token_budget", None) is not None:
        field = "thinking_token_budget"
    else:
        return
    raise InvalidRequestError(
        f"Unsupported parameter: '{field}': the model `{model}` is not set up to keep a thinking budget "
        "(no `reasoning-parser` in its `engine_args` in the gateway's configuration).",
        param=field,
        code="unsupported_parameter",
    )


def check_logprobs(endpoint: str, request: Any, most: int) -> None:
    """Refuses more logprobs per token than the engine returns (``most``; -1:
    no limit), naming the client's own field and value: vLLM names its
    internal ``logprobs`` and, for -1 (its "every token"), the vocabulary's size."""
    field = "logprobs" if endpoint == "completion" else "top_logprobs"
    asked = getattr(request, field, None)
    if endpoint == "chat" and not request.logprobs:
        return  # vLLM's schema has refused top_logprobs without logprobs
    if not isinstance(asked, int) or isinstance(asked, bool) or most < 0:
        return
    if asked == -1:
        raise InvalidRequestError(
            f"Invalid '{field}': -1 asks for every token's logprob; this model returns at most {most} per token.",
            param=field,
        )
    if asked > most:
        raise InvalidRequestError(
            f"Invalid '{field}': integer above maximum value. Expected a value <= {most}, but got {asked} instead.",
            param=field,
            code="integer_above_max_value",
        )


def check_window(prompt: int, budget: int | None, limit: int, param: str) -> None:
    """Refuses prompt + output budget beyond the context window (a budget
    beyond it alone was refused before the prompt was rendered); without a
    budget, a prompt that leaves the window no room for one token."""
    if budget is None:
        if prompt >= limit:  # vLLM's own words named max_tokens, a field not sent
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, your {param} "
                f"has {prompt} tokens, leaving none to generate. Please reduce the length of the {param}.",
                param=param,
            )
        return
    if prompt + budget <= limit:
        return
    output = "output" if param == "input" else "completion"
    raise ContextLengthExceededError(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt + budget} tokens ({prompt} in the {param}, {budget} in the {output}). "
        f"Please reduce the length of the {param} or {output}.",
        param=param,
    )
