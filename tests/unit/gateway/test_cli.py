"""gateway/cli.py: `llm-gateway serve` on a front-door port that is taken."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_serve_on_a_taken_port_says_so_before_starting_ray(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"models": [{"name": "echo", "engine": "echo"}]}))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # another gateway, say, or a stray HAProxy
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "starting Ray" not in done.stdout


def test_the_front_door_check_finds_a_free_port_free() -> None:
    from gateway.local_cluster import free_port, front_door_taken

    assert front_door_taken("127.0.0.1", free_port()) is None
