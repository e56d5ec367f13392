"""A small registered and exported model version in a home of its own, for tests of what comes
after export (the optimisation gate, batch scoring)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pipelines import stages
from pipelines.config import Settings, settings, with_overrides
from tests.ports import FREE_PORTS


@contextmanager
def home_settings(home: Path, env: dict[str, str]) -> Iterator[Settings]:
    """The process-wide settings of ``home`` with ``env`` (the local profile, no config file)
    until the block ends."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLOPS_HOME", str(home))
        for name, value in env.items():
            mp.setenv(name, value)
        for name in ("MLOPS_PROFILE", "MLOPS_CONFIG"):
            mp.delenv(name, raising=False)
        settings.cache_clear()
        try:
            yield settings()
        finally:
            settings.cache_clear()


@contextmanager
def exported_version(
    home: Path, day: str = "2026-11-01", rows: int = 6000, **overrides: dict[str, Any]
) -> Iterator[tuple[Settings, str]]:
    """One node, 2 epochs, evaluation forced to bless (any model will do), registered and
    exported; the process-wide settings see the home until the block ends."""
    env = {**FREE_PORTS, "MLOPS__TRAIN__NODES": "1", "MLOPS__TRAIN__EPOCHS": "2"}
    with home_settings(home, env) as base:
        s = with_overrides(
            base,
            **{
                "evaluate": {"behaviour": False, "plots": False, "bootstrap_samples": 10},
                **overrides,
            },
        )
        stages.generate_data(s, day, rows=rows)
        stages.validate_data(s, day)
        run_id = stages.train(s, stages.shard_data(s, day)["manifest_uri"])["run_id"]
        stages.evaluate(s, run_id, force="bless", reason="test: any model will do")
        version = stages.register(s, run_id)["model_version"]
        assert version is not None
        stages.export_and_infra_validate(s, version)
        yield s, version
