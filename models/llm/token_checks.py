"""Token ids a client sends to be read back as text (``/detokenize``): each
must be one of the model's. vLLM's tokenizer decodes an id past its
vocabulary as nothing, so ``[999999]`` came back as an empty text, and one
past a 64-bit integer as a Rust error naming no field; vLLM refuses such
ids in a prompt. Here they are refused naming the id's place."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import InvalidRequestError


def check_token_ids(tokens: Sequence[int], largest: int | None, field: str = "tokens") -> None:
    """Refuses (400) the first id of ``tokens`` outside 0 to ``largest`` (None: no bound known)."""
    if largest is None:
        return
    for index, token in enumerate(tokens):
        if not 0 <= token <= largest:
            raise InvalidRequestError(
                f"Invalid '{field}[{index}]': token id {token} is not in the model's vocabulary (0 to {largest}).",
                param=f"{field}[{index}]",
            )
