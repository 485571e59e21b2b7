"""models/llm/vllm_compat.py: the engine starts as `vllm serve` starts it."""

from __future__ import annotations

from typing import Any

import pytest

from models.llm import vllm_compat


class _Started(Exception):
    pass


async def test_the_engine_starts_with_vllm_serves_usage_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM picks its batch defaults by this context: an engine of another context ran 128 sequences on a
    # GPU where `vllm serve` runs 1024, and queued the rest.
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    seen: list[Any] = []

    def from_engine_args(engine_args: Any, usage_context: Any = None) -> Any:
        seen.append(usage_context)
        raise _Started

    monkeypatch.setattr(AsyncLLM, "from_engine_args", from_engine_args)
    with pytest.raises(_Started):
        await vllm_compat.build_serving(["--model", "m"], lambda generate, kind: generate)
    assert seen == [UsageContext.OPENAI_API_SERVER]
