"""vLLM's tokenizer routes (``POST /tokenize``, ``POST /detokenize``) as the
OpenAPI document describes them; the model's vLLM serving layer validates
and answers them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TokenizeRequest(BaseModel):
    """A ``prompt`` (completions' way), or ``messages`` rendered with the
    model's chat template (chat's way), never both."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(
        None, min_length=1, description="Model or alias whose tokenizer counts; unset: the one LLM served."
    )
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = Field(None, description="Default: true for a prompt, false for messages.")
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None
    tools: list[dict[str, Any]] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = Field(None, min_length=1, description="Unset: the one LLM served.")
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
