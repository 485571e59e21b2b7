"""gateway/http/open_inference.py: models are looked up as the inference route
looks them up; the server's version comes from the installed package."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import pytest

import gateway
from gateway.config import FrontDoorConfig
from gateway.errors import ModelNotFoundError
from gateway.http import open_inference
from gateway.http.state import GatewayState


@pytest.fixture
def fresh_metadata() -> Iterator[None]:
    open_inference.server_metadata.cache_clear()
    yield
    open_inference.server_metadata.cache_clear()


def test_a_gateway_serving_nothing_yet_knows_no_model() -> None:
    state = GatewayState(FrontDoorConfig(), lambda model: None, lambda model: "")
    with pytest.raises(ModelNotFoundError, match="`iris`"):
        open_inference.inference_model(state, "iris", None)


def test_the_version_is_the_installed_packages(fresh_metadata: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"llm-gateway": "9.8.7"}[name])
    assert open_inference.server_metadata().version == "9.8.7"


def test_run_from_a_source_tree_the_version_is_the_modules(
    fresh_metadata: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert open_inference.server_metadata().version == gateway.__version__
