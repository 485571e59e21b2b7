"""gateway/config: a vLLM model's LoRA adapters are names clients send, as
unique as models' and aliases', and local ones must be there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, VLLMModelConfig, parse_config


def vllm(name: str = "base", **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "model": "org/model", **fields}


def adapter(root: Path, name: str = "ada") -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text('{"r": 8}')
    return root / name


def test_an_adapter_is_served_by_its_model_and_routable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter(tmp_path / "adapters")
    monkeypatch.chdir(tmp_path)
    config = parse_config(
        {
            "models": [vllm(lora_adapters={"ada": "./adapters/ada", "hub": "org/sql-lora"}), {"name": "e", "engine": "echo"}],
            "routing": {"routes": [{"name": "ab", "variants": {"base": 1, "ada": 1}}]},
        }
    )
    base = config.model("base")
    assert isinstance(base, VLLMModelConfig)
    assert base.lora_adapters == {"ada": str((tmp_path / "adapters" / "ada").resolve()), "hub": "org/sql-lora"}
    assert {name: model.name for name, model in config.adapters().items()} == {"ada": "base", "hub": "base"}
    assert list(config.served()) == ["base", "e", "ada", "hub"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": [vllm(lora_adapters={"e": "org/x"}), {"name": "e", "engine": "echo"}]}, "has the name of another model"),
        ({"models": [vllm(lora_adapters={"x": "org/x"}), vllm("other", lora_adapters={"x": "org/y"})]}, "'x' of 'other'"),
        ({"models": [vllm(lora_adapters={"base": "org/x"})]}, "has the name of its own model"),
        (
            {"models": [vllm(lora_adapters={"x": "org/x"})], "routing": {"routes": [{"name": "x", "variants": {"base": 1}}]}},
            "the alias collides with a model",
        ),
        ({"models": [vllm(lora_adapters={"x": "org/x"}, engine_args={"lora-modules": "x=org/x"})]}, "leave it out"),
        ({"models": [vllm(lora_adapters={"x": "org/x"}, engine_args={"enable-lora": False})]}, "or set it true"),
        # vLLM's parser reads underscores as dashes: so do the gateway's checks.
        ({"models": [vllm(lora_adapters={"x": "org/x"}, engine_args={"lora_modules": "x=org/x"})]}, "leave it out"),
        ({"models": [vllm(lora_adapters={"x": "org/x"}, engine_args={"enable_lora": False})]}, "or set it true"),
        # vLLM's other name for the same setting.
        ({"models": [vllm(lora_adapters={"x": "org/x"}, engine_args={"no-enable-lora": True})]}, "or set it true"),
        ({"models": [vllm(engine_args={"max_loras": 2, "max-loras": 4})]},
         "sets 'max-loras' twice \\(as 'max_loras' and 'max-loras'\\)"),
        # vLLM's parser reads it as --max-model-len 77, the gateway's to set.
        ({"models": [vllm(engine_args={"max-model-len=77": True})]}, "'max-model-len=77' is no vLLM flag name"),
        ({"models": [vllm(lora_adapters={"bad name": "org/x"})]}, "lora_adapters"),
        ({"models": [vllm(lora_adapters={"x": "./missing"})]}, r"models\[base\]\.lora_adapters\.x: no adapter_config\.json"),
    ],
    ids=["another-model", "two-models", "own-model", "alias", "lora-modules", "lora-off", "lora_modules", "lora_off",
         "no-enable-lora",
         "twice", "flag-with-value", "name-pattern", "missing-directory"],
)
def test_a_clashing_or_missing_adapter_is_refused_naming_it(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_adapter_settings_written_with_underscores_are_the_engines_not_set_twice() -> None:
    # The engine took the last of --max-loras 1 and --max_loras 4 while the gateway planned for 1.
    base = parse_config({"models": [vllm(lora_adapters={"x": "org/x"}, engine_args={"max_loras": 4})]}).model("base")
    assert isinstance(base, VLLMModelConfig)
    assert base.engine_args == {"max-loras": 4}
    assert base.deployment_args()["engine_args"] == {"enable-lora": True, "max-loras": 4}


def test_a_dotted_engine_arg_keeps_its_fields_spelling_as_vllms_parser_does() -> None:
    # `--speculative-config.num_speculative_tokens`: the part after the dot is a config field.
    base = parse_config({"models": [vllm(engine_args={
        "speculative_config.num_speculative_tokens": 3, "compilation-config.cudagraph_capture_sizes": "[1,2]",
    })]}).model("base")  # fmt: skip
    assert base.engine_args == {
        "speculative-config.num_speculative_tokens": 3, "compilation-config.cudagraph_capture_sizes": "[1,2]",
    }
