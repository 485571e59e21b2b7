"""The seam between the batched server and a model library.

A predictor validates one request's instances on their own (so a bad one
fails only its request) and predicts for many requests' instances at once
(so a batch costs one model call).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.config import ModelConfig


class Predictor(Protocol):
    """A loaded classical model."""

    kind: str  # "classifier" or "embedding", as in gateway.config.ENGINE_KINDS
    outputs: tuple[str, ...]  # the Open Inference Protocol output tensors it answers with

    def inputs(self, instances: Sequence[Any], param: str, *, lone: bool = False) -> Any:
        """One request's instances, checked and converted for ``predict``.

        Raises ``gateway.errors.InvalidRequestError`` naming the first bad
        instance by its path, ``param[index]``, or ``param`` alone where
        ``lone`` (the client sent one instance as is, not in a list).
        """
        ...

    def size(self, inputs: Any) -> int:
        """How many instances ``inputs`` (from ``inputs()``) holds."""
        ...

    def predict(self, batch: Sequence[Any]) -> list[list[Any]]:
        """Predictions for each request's inputs, in order, from one model call."""
        ...


# scikit-learn's own check of what reaches an estimator (``_assert_all_finite``):
# a value its dtype cannot hold (1e308 where a tree computes in float32, or
# where a scaler's step overflows), or NaN.
_REFUSED = re.compile(r"^Input( \w+)? contains (NaN|infinity)")


def refused_input(exc: BaseException) -> str | None:
    """What the model library said of a request's inputs it cannot compute
    with, where ``exc`` is that (a client's error); else None (the model's)."""
    said = str(exc)
    return said if isinstance(exc, ValueError) and _REFUSED.match(said) else None


def load_predictor(config: ModelConfig) -> Predictor:
    """Loads ``config.model`` with the library its engine names."""
    from gateway.config import EmbeddingModelConfig, SklearnModelConfig

    if isinstance(config, SklearnModelConfig):
        from models.classical.sklearn import SklearnPredictor

        if config.mlflow_uri:
            return SklearnPredictor.from_mlflow(str(config.model), config.mlflow_tracking_uri)
        return SklearnPredictor.load(str(config.model))
    if isinstance(config, EmbeddingModelConfig):
        from models.classical.embedding import EmbeddingPredictor

        device = "cuda" if config.num_gpus > 0 else "cpu"
        return EmbeddingPredictor.load(
            str(config.model), device=device, threads=config.num_threads, dtype=config.dtype
        )
    raise ValueError(f"{config.engine!r} is not a classical-model engine")
