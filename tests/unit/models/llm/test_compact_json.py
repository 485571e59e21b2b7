"""models/llm/compact_json.py: constrained JSON without free whitespace, as vLLM and xgrammar take it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import VLLMModelConfig
from models.llm import compact_json
from models.llm.vllm_engine import VLLMEngine

TOKENIZER = Path(__file__).resolve().parents[4] / ".models" / "tiny-chat-v1"
USER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def vllm_model(**fields: Any) -> VLLMModelConfig:
    return VLLMModelConfig(name="m", model="org/m", **fields)


@pytest.mark.parametrize(
    ("fields", "compact"),
    [
        ({}, True),
        ({"json_whitespace": "compact"}, True),
        ({"json_whitespace": "any"}, False),
        ({"engine_args": {"structured-outputs-config": '{"backend": "guidance"}'}}, False),
        # A field of the setting: vLLM's parser takes it for the whole, the gateway's compact one gone.
        ({"engine_args": {"structured_outputs_config.backend": "guidance"}}, False),
    ],
    ids=["default", "compact", "any", "own-engine-args", "own-engine-field"],
)
def test_compact_unless_asked_otherwise(fields: dict[str, Any], compact: bool) -> None:
    config = vllm_model(**fields)
    args = VLLMEngine(config).cli_args()
    assert compact_json.is_compact(config) is compact
    whole = "structured-outputs-config" in fields.get("engine_args", {})
    assert ("--structured-outputs-config" in args) is (compact or whole)
    assert any(arg.startswith("--structured-outputs-config") for arg in args) is (compact or "engine_args" in fields)


def test_vllm_parses_the_engine_settings() -> None:
    # A contract with the installed vLLM: its own parser turns our arguments
    # into whitespace-free structured outputs on the xgrammar backend.
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(VLLMEngine(vllm_model()).cli_args())
    settings = AsyncEngineArgs.from_cli_args(args).structured_outputs_config
    assert settings.disable_any_whitespace is True
    assert settings.backend == "xgrammar"


def tool_tag(json_format: dict[str, Any]) -> str:
    """A structural tag shaped like the one vLLM builds for a forced hermes tool call."""
    return json.dumps({
        "type": "structural_tag",
        "format": {"type": "sequence", "elements": [
            {"type": "const_string", "value": '<tool_call>\n{"name": "get_weather", "arguments": '},
            json_format,
            {"type": "const_string", "value": "}\n</tool_call>"},
        ]},
    })


def params(tag: str | None) -> Any:
    return SimpleNamespace(structured_outputs=SimpleNamespace(structural_tag=tag))


def test_json_regions_of_a_structural_tag_are_bounded() -> None:
    request = params(tool_tag({"type": "json_schema", "json_schema": USER_SCHEMA}))
    compact_json.compact_structural_tag(request)
    elements = json.loads(request.structured_outputs.structural_tag)["format"]["elements"]
    assert elements[1] == {"type": "json_schema", "json_schema": USER_SCHEMA, "max_whitespace_cnt": 1}
    assert [e["type"] for e in elements] == ["const_string", "json_schema", "const_string"]


def test_a_users_schema_and_an_explicit_bound_are_left_alone() -> None:
    # A property the user called "type" with value "json_schema" is schema, not format.
    schema = {"type": "object", "properties": {"type": {"const": "json_schema"}}}
    tag = tool_tag({"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 4})
    request = params(tag)
    compact_json.compact_structural_tag(request)
    assert request.structured_outputs.structural_tag == tag


@pytest.mark.parametrize("request_params", [SimpleNamespace(structured_outputs=None), params(None)])
def test_requests_without_a_structural_tag_are_untouched(request_params: Any) -> None:
    before = repr(request_params)
    compact_json.compact_structural_tag(request_params)
    assert repr(request_params) == before


def test_xgrammar_compiles_the_bounded_tag() -> None:
    import xgrammar
    from transformers import AutoTokenizer

    compiler = xgrammar.GrammarCompiler(
        xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(TOKENIZER))
    )
    request = params(tool_tag({"type": "json_schema", "json_schema": USER_SCHEMA}))
    compact_json.compact_structural_tag(request)
    grammar = compiler.compile_structural_tag(request.structured_outputs.structural_tag)
    matcher = xgrammar.GrammarMatcher(grammar)
    prefix = '<tool_call>\n{"name": "get_weather", "arguments": '
    assert matcher.accept_string(prefix + '{ "city": "Paris"}')
    assert not xgrammar.GrammarMatcher(grammar).accept_string(prefix + '{  "city"')


def test_an_engine_setting_of_false_turns_the_engine_default_off() -> None:
    # Prefix caching is on by default in vLLM: `false` must reach it as --no-enable-prefix-caching.
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from models.llm.vllm_compat import parse_cli_args

    config = vllm_model(engine_args={"enable-prefix-caching": False, "disable-log-stats": False, "enforce-eager": True})
    args = parse_cli_args(make_arg_parser(FlexibleArgumentParser()), VLLMEngine(config).cli_args())
    assert args.enable_prefix_caching is False  # (None, its default, means on)
    assert args.disable_log_stats is False and args.enforce_eager is True  # a flag with no --no- form: left out


def test_a_config_fields_true_or_false_reaches_vllm_as_json() -> None:
    # As --no-structured-outputs-config.disable_any_whitespace, vLLM's parser failed with an IndexError.
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from models.llm.vllm_compat import parse_cli_args

    fields = {"structured_outputs_config.backend": "guidance",
              "structured_outputs_config.disable_any_whitespace": False}
    cli_args = VLLMEngine(vllm_model(engine_args=fields)).cli_args()
    args = parse_cli_args(make_arg_parser(FlexibleArgumentParser()), cli_args)
    assert (args.structured_outputs_config.backend, args.structured_outputs_config.disable_any_whitespace) == (
        "guidance", False
    )


@pytest.mark.parametrize(
    "engine_args",
    [{"max-model": 99}, {"served-model": "other"}, {"enable-prefix-cachin": False}, {"enforce-eagre": True}],
    ids=["abbreviates-max-model-len", "abbreviates-served-model-name", "misspelt-false", "misspelt-true"],
)
def test_an_engine_setting_vllm_has_no_flag_of_is_refused(engine_args: dict[str, Any]) -> None:
    # vLLM's parser took abbreviations (max-model set max_model_len past the gateway's own), and a
    # misspelt flag set false was dropped unseen.
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from models.llm.vllm_compat import parse_cli_args

    args = VLLMEngine(vllm_model(engine_args=engine_args)).cli_args()
    with pytest.raises(SystemExit):
        parse_cli_args(make_arg_parser(FlexibleArgumentParser()), args)
