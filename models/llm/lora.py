"""A vLLM model's LoRA adapters (``lora_adapters`` in its config) as vLLM's
command line loads them: each under its own name, served beside the base
model by the same replicas.

vLLM's defaults would surprise here: a rank limit of 16 (an adapter of rank
32 fails the engine's start) and one adapter per batch (requests for two
adapters would take turns). Unless ``engine_args`` says otherwise, the limit
is the smallest vLLM allows above every local adapter's own ``r``, and every
adapter can run in the same batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

# The ranks vLLM's ``--max-lora-rank`` takes.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_args(adapters: Mapping[str, str], given: Mapping[str, object]) -> list[str]:
    """vLLM's arguments for ``adapters`` (name: directory or hub id); ``given``:
    the model's own ``engine_args``, whose settings win."""
    if not adapters:
        return []
    args = ["--enable-lora", "--lora-modules", *(f"{name}={source}" for name, source in adapters.items())]
    if "max-lora-rank" not in given:
        rank = rank_limit(adapter_rank(Path(source)) for source in adapters.values())
        if rank is not None:
            args += ["--max-lora-rank", str(rank)]
    if "max-loras" not in given:
        args += ["--max-loras", str(len(adapters))]
    return args


def adapter_rank(directory: Path) -> int | None:
    """The rank (PEFT's ``r``) of the adapter in ``directory``; None when it
    is not a local adapter (a hub id) or does not say."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def rank_limit(ranks: Iterable[int | None]) -> int | None:
    """The smallest of vLLM's rank limits that fits every known rank (None:
    none known, vLLM's default stays; past vLLM's largest, that one, which
    vLLM then refuses naming the adapter)."""
    known = [rank for rank in ranks if rank is not None]
    if not known:
        return None
    return next((limit for limit in VLLM_RANKS if limit >= max(known)), VLLM_RANKS[-1])
