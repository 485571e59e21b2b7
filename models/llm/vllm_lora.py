"""LoRA adapters loaded into and unloaded from a running vLLM engine, through
vLLM's own served-model registry (what ``vllm serve``'s
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` call).

Unloading takes the name away from new requests only: requests in flight
keep the adapter they started with, whose weights vLLM keeps cached until
another adapter needs the room. Loading a name again from another source
replaces its weights in place (vLLM's ``load_inplace``), so that no request
ever finds the name missing.
"""

from __future__ import annotations

from models.llm.vllm_compat import Serving


async def load(serving: Serving, name: str, source: str, replace: bool) -> str | None:
    """Serves adapter ``name`` from ``source`` (a directory or hub id); ``replace``:
    the name is served already, from another source. Returns None once it is
    served, or why vLLM could not load it (the name then serves what it did)."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    request = LoadLoRAAdapterRequest(lora_name=name, lora_path=source, load_inplace=replace)
    answer = await serving.models.load_lora_adapter(request)
    if isinstance(answer, serving.error_response):
        return f"vLLM could not load the LoRA adapter {name!r} from {source!r}: {answer.error.message}"
    if replace:
        # vLLM keeps the request it loaded with for the name's later requests:
        # with load_inplace set, each engine step would read the weights from
        # disk again and swap them in, for as long as the adapter is used.
        # They were swapped in once, just now.
        kept = serving.models.lora_requests.get(name)
        if kept is not None:
            kept.load_inplace = False
    return None


async def unload(serving: Serving, name: str) -> None:
    """Takes adapter ``name`` away from new requests."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    answer = await serving.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
    if isinstance(answer, serving.error_response):
        raise RuntimeError(f"vLLM could not unload the LoRA adapter {name!r}: {answer.error.message}")
