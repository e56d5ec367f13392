"""Run params -> settings overrides, in one place for the DAG's form and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_settings
from pipelines.params import RUN_PARAMS, apply_params, run_overrides


def test_params_map_to_their_sections() -> None:
    assert run_overrides(
        {"epochs": 3, "nodes": 2, "canary_steps": [5, "50"], "skip_shadow": True, "dataset": "x"}
    ) == {
        "train": {"epochs": 3, "nodes": 2},
        "canary": {"steps": (5, 50)},
        "shadow": {"enabled": False},
        "data": {"dataset": "x"},
    }


def test_empty_params_keep_the_configured_defaults(tmp_path: Path) -> None:
    base = load_settings({"MLOPS_HOME": str(tmp_path)})
    empty = {"epochs": None, "dataset": "", "canary_steps": [], "skip_shadow": False, "date": "x"}
    assert run_overrides(empty) == {}
    assert apply_params(base, empty) is base


def test_an_out_of_range_param_names_the_field(tmp_path: Path) -> None:
    base = load_settings({"MLOPS_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"train\.nodes"):
        apply_params(base, {"nodes": -1})


def test_every_settings_param_of_the_dag_is_mapped() -> None:
    """A param the DAG offers but nobody maps would be silently ignored."""
    from dags.mlops_training_pipeline import PARAMS

    # read by the tasks (reason: the lineage tag of a retraining run, mlops_airflow.common)
    run_control = {"date", "force", "force_reason", "skip_rollout", "reason"}
    assert set(PARAMS) - run_control == set(RUN_PARAMS) - {"procs_per_node"}
