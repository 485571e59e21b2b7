"""`POST /v1/embeddings` shapes (OpenAI's)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class InputError(ValueError):
    """A bad entry of an embeddings request's ``input``; ``param`` is its
    path as the message names it (``input[1]``, or ``input`` for a lone string)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; unknown fields are refused, not dropped."""

    model_config = ConfigDict(extra="forbid")

    input: str | Annotated[list[Any], Field(min_length=1)] = Field(description="Text, or a list of texts, to embed.")
    model: str = Field(min_length=1)
    # null, as clients that send every field send the unset ones: float.
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: StrictInt | None = Field(None, ge=1)  # not a boolean or "384", which lax parsing would read
    user: str | None = None

    def texts(self) -> list[str]:
        """The inputs as a list of texts.

        Raises InputError naming the first bad entry by its path: an empty
        text, token-id input (this gateway's embedding models take text), or
        a non-string.
        """
        items = [self.input] if isinstance(self.input, str) else self.input
        for index, item in enumerate(items):
            path = "input" if isinstance(self.input, str) else f"input[{index}]"
            if isinstance(item, str):
                if not item:
                    raise InputError(f"'{path}' is an empty string", path)
            elif isinstance(item, int) or (
                isinstance(item, list) and all(isinstance(t, int) for t in item)
            ):
                raise InputError(f"'{path}': token-id input is not supported; send text", path)
            else:
                raise InputError(f"'{path}' must be a string, not {type(item).__name__}", path)
        return list(items)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 when asked for


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
