"""A vLLM model's LoRA adapters (``lora_adapters`` in its config): the engine
settings they need, fixed when a replica starts, and the adapters themselves,
which a running replica loads and unloads (its ``user_config``).

vLLM's defaults would surprise here: a rank limit of 16 (an adapter of rank
32 fails to load) and one adapter per batch (requests for two adapters would
take turns). Unless ``engine_args`` says otherwise, the limit is the smallest
vLLM allows above every local adapter's own ``r``, and every adapter can run
in the same batch: the batch's adapter slots are the number of adapters
rounded up to a power of two, so that adding adapters up to that number is a
live change rather than a restart of the model's replicas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

# The ranks vLLM's ``--max-lora-rank`` takes, and its default.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16


def engine_settings(adapters: Mapping[str, str], given: Mapping[str, object]) -> dict[str, bool | int]:
    """vLLM's engine arguments (CLI names without ``--``) that serving
    ``adapters`` (name: directory or hub id) needs; ``given``: the model's own
    ``engine_args``, whose settings win. Empty without adapters."""
    if not adapters:
        return {}
    settings: dict[str, bool | int] = {"enable-lora": True}
    if "max-lora-rank" not in given:
        rank = rank_limit(adapter_rank(Path(source)) for source in adapters.values())
        if rank is not None:
            settings["max-lora-rank"] = rank
    if "max-loras" not in given:
        settings["max-loras"] = slots(len(adapters))
    return settings


def slots(count: int) -> int:
    """The adapter slots of a batch for ``count`` adapters: the power of two at or above it."""
    return 1 << max(count - 1, 0).bit_length()


def changes(loaded: Mapping[str, str], wanted: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """What turns the adapters ``loaded`` into ``wanted``: those to load (new,
    or from another source) and the names to unload."""
    load = {name: source for name, source in wanted.items() if loaded.get(name) != source}
    return load, [name for name in loaded if name not in wanted]


def adapter_rank(directory: Path) -> int | None:
    """The rank of the adapter in ``directory`` as vLLM weighs it against its
    limit: the largest of PEFT's ``r`` and the ranks of its ``rank_pattern``
    (layers of a rank of their own); None when it is not a local adapter (a
    hub id) or does not say."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not _is_rank(rank := config.get("r")):
        return None
    pattern = config.get("rank_pattern")
    layers = [r for r in pattern.values() if _is_rank(r)] if isinstance(pattern, dict) else []
    return max([rank, *layers])


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rank_limit(ranks: Iterable[int | None]) -> int | None:
    """The smallest of vLLM's rank limits that fits every known rank (None:
    none known, vLLM's default stays; past vLLM's largest, that one, which
    vLLM then refuses naming the adapter). Beside an adapter of unknown rank
    (a hub id), never below vLLM's default, which that one alone would get."""
    ranks = list(ranks)
    known = [rank for rank in ranks if rank is not None]
    if not known:
        return None
    if len(known) < len(ranks):
        known.append(VLLM_DEFAULT_RANK)
    return next((limit for limit in VLLM_RANKS if limit >= max(known)), VLLM_RANKS[-1])
