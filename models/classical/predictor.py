"""The seam between the batched server and a model library.

A predictor validates one request's instances on their own (so a bad one
fails only its request) and predicts for many requests' instances at once
(so a batch costs one model call).
"""

from __future__ import annotations

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
