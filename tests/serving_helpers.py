"""Shared by the serving contract suites: load versions through a real ModelManager and wait."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipelines.serving import model_config
from pipelines.serving.server import ModelManager


def load_versions(tmp_path: Path, name: str, base: Path, versions: list[int]) -> list[Any]:
    """The servables of ``versions`` once none is LOADING (each loads on its own thread)."""
    config = tmp_path / "models.config"
    model_config.write(config, [model_config.ModelEntry(name, str(base), versions)])
    manager = ModelManager(config, poll_seconds=60)
    manager.poll_once()
    servables = [manager.models[name].servables[v] for v in versions]
    deadline = time.monotonic() + 60
    while any(s.state == "LOADING" for s in servables) and time.monotonic() < deadline:
        time.sleep(0.1)
    return servables
