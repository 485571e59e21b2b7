"""Constrained JSON without free whitespace (``json_whitespace: compact``).

JSON grammars allow any run of whitespace between tokens. A small model at
temperature 0 can prefer whitespace and never close the object, running to
``max_tokens``. vLLM's ``disable_any_whitespace`` removes it from
``response_format`` grammars, but not from the structural tags that force tool
calls (``tool_choice`` named or ``required``); xgrammar bounds whitespace there
per JSON region (``max_whitespace_cnt``, at least 1), which vLLM leaves unset.
This module supplies both: the engine argument, and a bound of one whitespace
character between tokens applied to each request's structural tag as it
reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.config import STRUCTURED_OUTPUTS_ARG, VLLMModelConfig

# vLLM honours `disable_any_whitespace` only with a named backend: xgrammar, what
# `auto` picks, and the one that compiles tool-call structural tags.
ENGINE_SETTINGS = {"backend": "xgrammar", "disable_any_whitespace": True}


def is_compact(config: VLLMModelConfig) -> bool:
    """Whether ``config`` asks for compact JSON (unset means compact, unless the
    model's ``engine_args`` bring their own structured-output settings)."""
    if config.json_whitespace is not None:
        return config.json_whitespace == "compact"
    return not config.brings_structured_outputs


def engine_args() -> list[str]:
    """The ``vllm serve`` arguments that make constrained JSON compact."""
    return [f"--{STRUCTURED_OUTPUTS_ARG}", json.dumps(ENGINE_SETTINGS)]


def compact_structural_tag(sampling_params: Any) -> None:
    """Forbids free whitespace in the JSON regions of the request's structural tag
    (vLLM's ``SamplingParams``), if it has one; changes nothing else."""
    constraints = getattr(sampling_params, "structured_outputs", None)
    tag = getattr(constraints, "structural_tag", None)
    if constraints is None or not tag:
        return
    spec = json.loads(tag)
    if _bound_whitespace(spec):
        constraints.structural_tag = json.dumps(spec)


def _bound_whitespace(node: Any) -> bool:
    """Sets ``max_whitespace_cnt`` 1 on every JSON-schema format under ``node``
    that leaves it unbounded; True when anything changed."""
    changed = False
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and node.get("max_whitespace_cnt") is None:
            node["max_whitespace_cnt"] = 1  # xgrammar's least: 0 is refused
            changed = True
        for key, value in node.items():
            if key != "json_schema":  # the schema itself is the user's, not a format
                changed = _bound_whitespace(value) or changed
    elif isinstance(node, list):
        for item in node:
            changed = _bound_whitespace(item) or changed
    return changed
