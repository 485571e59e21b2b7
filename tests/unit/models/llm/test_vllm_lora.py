"""models/llm/vllm_lora.py and VLLMEngine.set_adapters: a running engine
serves exactly the adapters it is given, through vLLM's own registry, and
says which one it could not load."""

from __future__ import annotations

from typing import Any

from gateway.config import VLLMModelConfig
from models.llm.vllm_compat import Serving
from models.llm.vllm_engine import VLLMEngine


class Refusal:
    """Stands for vLLM's ErrorResponse."""

    def __init__(self, message: str) -> None:
        self.error = type("Error", (), {"message": message})()


class Registry:
    """vLLM's served-model registry (``OpenAIServingModels``), as far as adapters go."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.served: dict[str, str] = {}
        self.broken: set[str] = set()
        self.lora_requests: dict[str, Any] = {}  # what vLLM's later requests for the name carry

    async def load_lora_adapter(self, request: Any) -> Refusal | str:
        from vllm.lora.request import LoRARequest

        self.calls.append(("load", request.lora_name, request.lora_path, request.load_inplace))
        if request.lora_path in self.broken:
            return Refusal(f"Loading lora {request.lora_name} failed: No adapter found for {request.lora_path}")
        self.served[request.lora_name] = request.lora_path
        self.lora_requests[request.lora_name] = LoRARequest(
            request.lora_name, len(self.lora_requests) + 1, request.lora_path, load_inplace=request.load_inplace
        )
        return "Success"

    async def unload_lora_adapter(self, request: Any) -> Refusal | str:
        self.calls.append(("unload", request.lora_name))
        del self.served[request.lora_name]
        return "Success"


def engine_with(registry: Registry) -> VLLMEngine:
    engine = VLLMEngine(VLLMModelConfig(name="base", model="org/model"))
    engine._serving = Serving(engine=None, model_config=None, max_model_len=64, models=registry, error_response=Refusal)
    return engine


async def test_new_adapters_load_moved_ones_reload_in_place_and_gone_ones_unload() -> None:
    registry = Registry()
    engine = engine_with(registry)
    assert await engine.set_adapters({"a": "/a", "b": "/b"}) == {}
    await engine.set_adapters({"a": "/a2", "b": "/b", "c": "/c"})
    await engine.set_adapters({"c": "/c"})
    await engine.set_adapters({"c": "/c"})  # nothing changed: nothing asked of vLLM
    assert registry.calls == [
        ("load", "a", "/a", False),
        ("load", "b", "/b", False),
        ("load", "a", "/a2", True),  # in place: no request finds the name missing meanwhile
        ("load", "c", "/c", False),
        ("unload", "a"),
        ("unload", "b"),
    ]
    assert registry.served == {"c": "/c"}


async def test_an_adapter_reloaded_in_place_is_not_reloaded_at_every_step_after() -> None:
    # vLLM's later requests for the name carry the request it loaded with:
    # with load_inplace still set, its worker read the weights from disk
    # again at each engine step.
    registry = Registry()
    engine = engine_with(registry)
    await engine.set_adapters({"a": "/a"})
    await engine.set_adapters({"a": "/a2"})
    assert registry.calls[-1] == ("load", "a", "/a2", True)
    kept = registry.lora_requests["a"]
    assert (kept.lora_path, kept.load_inplace) == ("/a2", False)


async def test_an_adapter_vllm_cannot_load_is_named_and_tried_again_next_time() -> None:
    registry = Registry()
    registry.broken.add("/missing")
    engine = engine_with(registry)
    failed = await engine.set_adapters({"x": "/missing", "y": "/y"})
    assert list(failed) == ["x"] and "from '/missing': Loading lora x failed: No adapter found" in failed["x"]
    assert registry.served == {"y": "/y"}  # the others load all the same
    registry.broken.clear()
    assert await engine.set_adapters({"x": "/missing", "y": "/y"}) == {}
    assert registry.served == {"x": "/missing", "y": "/y"}
