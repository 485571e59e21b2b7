"""models/llm/tiny_lora.py: the local adapter is PEFT's format for the tiny
model's shapes, and the same on every build."""

from __future__ import annotations

import json
from pathlib import Path

from models.llm.tiny_lora import TinyAdapterSpec, build_adapter, build_all, is_built

BASE = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2}


def test_the_adapter_fits_its_base_and_is_rebuilt_the_same(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(BASE))
    spec = TinyAdapterSpec(name="ada", base="base", seed=3, rank=4)
    first = build_adapter(spec, tmp_path / "base", tmp_path / "one")
    config = json.loads((first / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LORA", 4, ["q_proj", "v_proj"])
    weights = load_file(str(first / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 2  # two layers, two targets, A and B
    layer = "base_model.model.model.layers.1.self_attn"
    assert tuple(weights[f"{layer}.q_proj.lora_A.weight"].shape) == (4, 256)
    assert tuple(weights[f"{layer}.v_proj.lora_B.weight"].shape) == (2 * 64, 4)
    second = load_file(str(build_adapter(spec, tmp_path / "base", tmp_path / "two") / "adapter_model.safetensors"))
    assert all(bool((weights[name] == second[name]).all()) for name in weights)
    assert is_built(first) and not is_built(tmp_path / "base")


def test_build_all_builds_what_is_missing_beside_its_base(tmp_path: Path) -> None:
    (tmp_path / "tiny-chat-v1").mkdir()
    (tmp_path / "tiny-chat-v1" / "config.json").write_text(json.dumps(BASE))
    [path] = build_all(tmp_path)
    assert path == tmp_path / "tiny-chat-v1-lora" and is_built(path)
    stamp = (path / "adapter_model.safetensors").stat().st_mtime_ns
    build_all(tmp_path)
    assert (path / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # built once
