"""gateway/app.py: the Serve deployments the gateway is made of."""

from __future__ import annotations

from pathlib import Path

from gateway.app import ingress_app_builder, model_deployment
from gateway.config import parse_config


def test_serve_writes_no_access_log_line_of_its_own(tmp_path: Path) -> None:
    # The gateway logs each request once (``gateway.http.access_log``); a line
    # of Serve's own per request, or per model call, would be a second,
    # written on the hot path.
    config = parse_config(
        {"models": [{"name": "echo", "engine": "echo"}, {"name": "iris", "engine": "sklearn", "model": str(tmp_path)}]}
    )
    apps = [
        ingress_app_builder({"gateway": config.front_door().model_dump(mode="json")}),
        *(model_deployment(model) for model in config.models),
    ]
    for app in apps:
        assert app._bound_deployment.logging_config["enable_access_log"] is False
