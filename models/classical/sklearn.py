"""scikit-learn estimators loaded from a joblib file.

Instances are rows of numbers, one per feature. A classifier answers each row
with its label and class probabilities (when it has ``predict_proba``);
anything else answers with ``predict``'s value.

joblib files are pickles: serve only files you trust.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from gateway.errors import InvalidRequestError

MODEL_FILE = "model.joblib"


class SklearnPredictor:
    kind = "classifier"

    def __init__(self, estimator: Any) -> None:
        if not hasattr(estimator, "predict") or not hasattr(estimator, "n_features_in_"):
            raise TypeError("the file does not hold a fitted scikit-learn estimator")
        self._estimator = estimator
        self.n_features = int(estimator.n_features_in_)
        self._proba = hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_")
        self.classes = [_plain(c) for c in estimator.classes_] if self._proba else []
        self.outputs: tuple[str, ...] = ("label", "probabilities") if self._proba else ("predict",)

    @classmethod
    def load(cls, path: str) -> SklearnPredictor:
        """Loads a joblib file, or the ``model.joblib`` inside a directory."""
        file = Path(path)
        if file.is_dir():
            file = file / MODEL_FILE
        return cls(joblib.load(file))

    @classmethod
    def from_mlflow(cls, uri: str, tracking_uri: str | None = None) -> SklearnPredictor:
        """Loads a scikit-learn model logged to MLflow: ``models:/name/<version>``,
        ``models:/name@<alias>`` or ``runs:/<run id>/<path>``, looked up in
        ``tracking_uri`` (MLflow's default when None). Needs the ``mlflow`` extra."""
        try:
            import mlflow
            import mlflow.sklearn
        except ImportError:
            raise RuntimeError(
                f"{uri} is an MLflow model URI: install llm-gateway's `mlflow` extra"
            ) from None
        if tracking_uri is not None:
            # One model per replica process, so the process-wide setting is ours.
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        return cls(mlflow.sklearn.load_model(uri))

    def inputs(self, instances: Sequence[Any], param: str, *, lone: bool = False) -> np.ndarray:
        for index, row in enumerate(instances):
            problem = self._problem(row)
            if problem:
                where = param if lone else f"{param}[{index}]"
                raise InvalidRequestError(f"{where}: {problem}", param=where)
        return np.asarray(instances, dtype=np.float64).reshape(len(instances), self.n_features)

    def _problem(self, row: Any) -> str | None:
        if not isinstance(row, list):
            return f"expected a list of {self.n_features} numbers, got {_json_type(row)}"
        if len(row) != self.n_features:
            return f"expected {self.n_features} features, got {len(row)}"
        for position, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"feature {position} is not a number ({_json_type(value)})"
            if not _finite(value):
                return f"feature {position} is not a finite number"
        return None

    def size(self, inputs: np.ndarray) -> int:
        return int(inputs.shape[0])

    def predict(self, batch: Sequence[np.ndarray]) -> list[list[Any]]:
        rows = np.concatenate(batch) if len(batch) > 1 else batch[0]
        labels = [_plain(value) for value in self._estimator.predict(rows)]
        answers: list[Any] = labels
        if self._proba:
            # The label is predict()'s own: for some estimators it is not the
            # most probable class.
            answers = [
                {"label": label, "probabilities": dict(zip(self.classes, map(float, p)))}
                for label, p in zip(labels, self._estimator.predict_proba(rows))
            ]
        out, start = [], 0
        for inputs in batch:
            out.append(answers[start : start + len(inputs)])
            start += len(inputs)
        return out


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite float64 (JSON's integers may be far larger)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _plain(value: Any) -> Any:
    """A numpy scalar as the JSON-native Python value."""
    return value.item() if isinstance(value, np.generic) else value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
