"""Builds a LoRA adapter of the local tiny chat model, in PEFT's format.

An adapter on the query and value projections of every layer, of seeded
weights strong enough that the adapted model says something else than its
base: what a fine-tuned adapter does to a real model, in miniature. Like the
base model, it derives from its seed, so two builds are the same adapter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from models.llm.tiny import build_missing

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class TinyAdapterSpec:
    name: str
    base: str  # the tiny chat model it adapts (a directory beside it)
    seed: int
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")


TINY_ADAPTERS = (TinyAdapterSpec(name="tiny-chat-v1-lora", base="tiny-chat-v1", seed=11),)


def is_built(path: Path) -> bool:
    return all((path / name).is_file() for name in ADAPTER_FILES)


def build_adapter(spec: TinyAdapterSpec, base_dir: Path, out_dir: Path) -> Path:
    """Writes the adapter of the model in ``base_dir`` into ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    base = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    head_dim = base["head_dim"]
    sizes = {  # each target's (in, out) features
        "q_proj": (base["hidden_size"], base["num_attention_heads"] * head_dim),
        "v_proj": (base["hidden_size"], base["num_key_value_heads"] * head_dim),
    }
    generator = torch.Generator().manual_seed(spec.seed)
    weights = {}
    for layer in range(base["num_hidden_layers"]):
        for target in spec.targets:
            fan_in, fan_out = sizes[target]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(spec.rank, fan_in, generator=generator) / fan_in**0.5
            weights[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, spec.rank, generator=generator)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(weights, str(out_dir / "adapter_model.safetensors"))  # last: it marks the build complete
    logger.info("built the LoRA adapter %s of %s in %s", spec.name, spec.base, out_dir)
    return out_dir


def build_all(root: Path, *, force: bool = False) -> list[Path]:
    """Builds every missing adapter under ``root``, beside its base model."""

    def build(spec: TinyAdapterSpec, path: Path) -> Path:
        return build_adapter(spec, root / spec.base, path)

    return build_missing(root, TINY_ADAPTERS, "LoRA adapter", is_built, build, force=force)
