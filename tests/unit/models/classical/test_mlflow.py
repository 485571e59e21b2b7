"""models/classical/sklearn.py: scikit-learn models served from a real MLflow registry.

The registry keeps its metadata in SQLite and its artifacts in a folder, as a
team's local MLflow does; the model is registered, given the alias
`champion`, and loaded by version, by alias and by run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import ConfigError, SklearnModelConfig, parse_config
from models.classical.build import iris_data
from models.classical.predictor import load_predictor

# MLflow would report usage over the network; tests stay offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("mlflow")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    experiment = mlflow.create_experiment("iris", artifact_location=(root / "artifacts").as_uri())
    features, labels = iris_data()
    estimator = LogisticRegression(max_iter=500).fit(features, labels)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.sklearn.log_model(estimator, name="model", registered_model_name="iris")
    MlflowClient().set_registered_model_alias("iris", "champion", "1")
    # Loading must not lean on this process's settings: the replica starts fresh.
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    return {"tracking": tracking, "run": run.info.run_id, "estimator": estimator}


@pytest.mark.parametrize("uri", ["models:/iris/1", "models:/iris@champion", "runs:/{run}/model"])
def test_a_registered_model_answers_as_the_estimator_does(registry: dict[str, Any], uri: str) -> None:
    config = SklearnModelConfig(
        name="iris-mlflow",
        model=uri.format(run=registry["run"]),
        mlflow_tracking_uri=registry["tracking"],
    )
    predictor = load_predictor(config)
    features, _ = iris_data()
    (predicted,) = predictor.predict([predictor.inputs(features.tolist(), "instances")])
    expected = registry["estimator"]
    assert [p["label"] for p in predicted] == list(expected.predict(features))
    probabilities = np.array([[p["probabilities"][c] for c in expected.classes_] for p in predicted])
    np.testing.assert_allclose(probabilities, expected.predict_proba(features), atol=1e-12)


def test_an_mlflow_uri_is_not_taken_for_a_missing_file(tmp_path: Path) -> None:
    config = parse_config(
        {"models": [{"name": "m", "engine": "sklearn", "model": "models:/iris@champion"}]},
        base_dir=tmp_path,
    )
    assert config.models[0].model == "models:/iris@champion"


def test_mlflow_uris_are_for_the_sklearn_engine() -> None:
    with pytest.raises(ConfigError, match="sklearn"):
        parse_config({"models": [{"name": "m", "engine": "sentence-transformers", "model": "models:/e/1"}]})


def test_an_unknown_registered_model_fails_loading_clearly(registry: dict[str, Any]) -> None:
    config = SklearnModelConfig(name="x", model="models:/nope/1", mlflow_tracking_uri=registry["tracking"])
    with pytest.raises(Exception, match="nope"):
        load_predictor(config)
