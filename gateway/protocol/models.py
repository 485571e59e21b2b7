"""`GET /v1/models` shapes (OpenAI's, with vLLM's `root` and `max_model_len`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class AliasVariant(BaseModel):
    id: str
    weight: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-gateway"
    # Extensions: vLLM's `root`, `parent` (a LoRA adapter's model) and
    # `max_model_len`; what the model serves (`llm`, `classifier`,
    # `embedding`); for an alias, its variants.
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    kind: str | None = None
    variants: list[AliasVariant] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
