"""Tuning's pure parts: the search space in config (refusals name the field), sampling into
train settings, the worker job, thread shares, the budget rule, the study summary, and the
one-sentence storage error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from pipelines.config import ConfigError, TrainSettings, load_settings, with_overrides
from pipelines.params import run_overrides
from pipelines.tune import space as space_mod
from pipelines.tune.job import TuneJob, parse_job
from pipelines.tune.storage import StorageUnavailable, open_storage
from pipelines.tune.study import max_epochs, next_trial, pruner, summary, worker_threads


@pytest.fixture
def base(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_settings({"MLOPS_HOME": str(tmp_path)})


class FakeTrial:
    """Answers each suggestion with the lowest value (or the last choice); records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        self.calls.append(("float", name, {"low": low, "high": high, "step": step, "log": log}))
        return low

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        self.calls.append(("int", name, {"low": low, "high": high, "step": step, "log": log}))
        return low

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.calls.append(("categorical", name, {"choices": list(choices)}))
        return choices[-1]


def test_by_default_hyperband_cuts_the_trainers_epochs(base) -> None:  # type: ignore[no-untyped-def]
    """Epochs are the pruner's resource: not searched, each trial plans train.epochs, and that
    is Hyperband's max resource; a space that names epochs sets it with its high end."""
    t = base.tuning
    assert "epochs" not in t.space and t.pruner == "hyperband"
    assert max_epochs(t, base.train) == base.train.epochs
    p = pruner(t, max_epochs(t, base.train))
    assert isinstance(p, optuna.pruners.HyperbandPruner)
    assert p._max_resource == base.train.epochs and p._min_resource == 1
    named = with_overrides(base, tuning={"space": {"epochs": {"kind": "int", "low": 2, "high": 9}}})
    assert max_epochs(named.tuning, named.train) == 9


def test_the_default_space_samples_valid_train_settings(base) -> None:  # type: ignore[no-untyped-def]
    trial = FakeTrial()
    params = space_mod.suggest(trial, base.tuning.space)
    # Epochs are Hyperband's resource (train.epochs), not a searched dimension.
    assert set(params) == {"lr", "hidden", "dropout", "batch_size", "embedding_dim"}
    kinds = {name: (kind, kw) for kind, name, kw in trial.calls}
    assert kinds["lr"][0] == "float" and kinds["lr"][1]["log"] is True
    # Layer lists travel as strings in the study and come back as tuples.
    assert kinds["hidden"] == ("categorical", {"choices": ["32", "64-32", "128-64"]})
    assert params["hidden"] == (128, 64)
    TrainSettings.model_validate({**base.train.model_dump(), **params})


def test_stored_params_decode_to_train_overrides() -> None:
    assert space_mod.train_overrides({"hidden": "64-32", "lr": 0.01}) == {
        "hidden": (64, 32),
        "lr": 0.01,
    }
    assert space_mod.encode_choice([8]) == "8" and space_mod.decode("hidden", [8, 4]) == (8, 4)


@pytest.mark.parametrize(
    ("entry", "field", "says"),
    [
        ({"momentum": {"kind": "float", "low": 0, "high": 1}}, "momentum", "not a tunable"),
        ({"lr": {"kind": "float", "low": 0.1, "high": 0.01}}, "lr", "low <= high"),
        ({"lr": {"kind": "float", "low": 0.0, "high": 0.1, "log": True}}, "lr", "low > 0"),
        ({"dropout": {"kind": "float", "low": 0.0, "high": 1.5}}, "dropout", "1.5"),
        ({"batch_size": {"kind": "int", "low": 0, "high": 64}}, "batch_size", "train.batch_size"),
        ({"batch_size": {"kind": "categorical", "choices": []}}, "batch_size", "choices"),
        ({"hidden": {"kind": "categorical", "choices": [[64], [0]]}}, "hidden", "widths"),
        ({"hidden": {"kind": "int", "low": 8, "high": 64}}, "hidden", "categorical"),
        ({"epochs": {"kind": "int", "low": 1.5, "high": 4}}, "epochs", "whole"),
    ],
)
def test_a_bad_search_space_entry_is_refused_naming_the_field(  # type: ignore[no-untyped-def]
    base, entry: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        with_overrides(base, tuning={"space": entry})
    assert f"tuning.space.{field}" in str(err.value) and says in str(err.value)


def test_a_bad_entry_from_the_environment_names_the_field(tmp_path: Path) -> None:
    env = {
        "MLOPS_HOME": str(tmp_path),
        "MLOPS__TUNING__SPACE": '{"lr": {"kind": "float", "low": -1, "high": 0.1}}',
    }
    with pytest.raises(ConfigError, match=r"tuning\.space\.lr"):
        load_settings(env)


def test_heartbeat_grace_must_outlast_the_interval(base) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="grace_s"):
        with_overrides(base, tuning={"heartbeat_s": 10, "grace_s": 10})


def test_the_worker_job_carries_no_secret_and_round_trips(base) -> None:  # type: ignore[no-untyped-def]
    s = with_overrides(
        base,
        tuning={"storage": "postgresql+psycopg2://u:pw-123@db:5432/optuna"},
        mlflow={"token": "tok-abc"},
    )
    job = TuneJob.for_worker(s, "study-a", "file:///m.json", "run-1", 1, colocated=2)
    text = " ".join(job.argv())
    assert "pw-123" not in text and "tok-abc" not in text
    assert parse_job(job.argv()) == job
    with pytest.raises(ValueError, match="never carries secrets"):
        TuneJob.model_validate({**job.model_dump(), "tuning": s.tuning.model_dump()})


def test_torch_threads_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4}, raising=False)
    assert [worker_threads(w) for w in (1, 2, 3, 5, 8)] == [5, 2, 1, 1, 1]


def test_run_params_map_onto_tuning_and_train_settings() -> None:
    assert run_overrides({"trials": 8, "workers": 3, "params_from": "tuning", "study": "s1"}) == {
        "tuning": {"trials": 8, "workers": 3, "study": "s1"},
        "train": {"params_from": "tuning"},
    }


def _sqlite_study(tmp_path: Path, base) -> tuple[optuna.Study, Any]:  # type: ignore[no-untyped-def]
    storage = open_storage(base.tuning, f"sqlite:///{tmp_path / 'optuna.db'}")
    return optuna.create_study(storage=storage, study_name="u"), storage


def test_the_budget_counts_live_trials_and_queued_retries_go_first(  # type: ignore[no-untyped-def]
    tmp_path: Path, base
) -> None:
    study, storage = _sqlite_study(tmp_path, base)
    taken = []
    for _ in range(3):
        trial, _running = next_trial(study, 3, storage)
        assert trial is not None
        taken.append(trial)
    trial, running = next_trial(study, 3, storage)
    assert trial is None and running == 3  # budget reached while 3 run: wait, do not exit
    study.tell(taken[0], 0.5)
    study.tell(taken[1], state=optuna.trial.TrialState.PRUNED)
    study.tell(taken[2], state=optuna.trial.TrialState.FAIL)
    # A failed trial frees its place; a queued retry is taken even at a full budget.
    trial, _ = next_trial(study, 3, storage)
    assert trial is not None
    study.tell(trial, 0.4)
    study.enqueue_trial({"x": 1.0})
    retry, _ = next_trial(study, 3, storage)
    assert retry is not None and retry.number == 4
    study.tell(retry, 0.3)
    assert next_trial(study, 3, storage) == (None, 0)


def test_the_summary_counts_epochs_that_pruning_saved(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    study, _ = _sqlite_study(tmp_path, base)
    for value, state, planned, ran in (
        (0.2, "COMPLETE", 8, 8),
        (None, "PRUNED", 8, 2),
        (0.1, "COMPLETE", 4, 4),
        (None, "FAIL", 8, 3),  # a failed trial's epochs are not the budget's
    ):
        trial = study.ask()
        trial.set_user_attr("mlops.epochs_planned", planned)
        trial.set_user_attr("mlops.epochs_run", ran)
        if state == "COMPLETE":
            study.tell(trial, value)
        else:
            study.tell(trial, state=optuna.trial.TrialState[state])
    out = summary(study)
    assert (out["complete"], out["pruned"], out["failed"]) == (2, 1, 1)
    assert out["best_value"] == 0.1 and out["best_trial"] == 2
    assert out["epochs_planned"] == 20 and out["epochs_run"] == 14
    assert out["pruned_epoch_share"] == pytest.approx(0.3)


def test_an_unreachable_storage_is_named_in_one_sentence_with_the_password_masked(  # type: ignore[no-untyped-def]
    base,
) -> None:
    from pipelines.ports import free_port

    url = f"postgresql+psycopg2://tuner:hunter2-x@127.0.0.1:{free_port()}/optuna"
    with pytest.raises(StorageUnavailable) as err:
        open_storage(base.tuning, url)
    said = str(err.value)
    assert said.startswith("The study storage postgresql+psycopg2://tuner:***@127.0.0.1:")
    assert "cannot be reached" in said and "hunter2-x" not in said
    assert "\n" not in said


def test_outside_the_local_profile_a_missing_storage_is_refused(tmp_path: Path) -> None:
    from pipelines.tune.storage import acquire

    s = load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS_PROFILE": "kubernetes"})
    with pytest.raises(StorageUnavailable, match="MLOPS__TUNING__STORAGE"):
        acquire(s)


def test_a_beating_trial_outlives_the_grace_period_and_a_silent_one_is_requeued(  # type: ignore[no-untyped-def]
    tmp_path: Path, base
) -> None:
    import time

    from pipelines.tune.study import Heartbeat

    t = with_overrides(base, tuning={"heartbeat_s": 1, "grace_s": 2}).tuning
    storage = open_storage(t, f"sqlite:///{tmp_path / 'hb.db'}")
    study = optuna.create_study(storage=storage, study_name="hb")
    trial, _ = next_trial(study, 5, storage)
    assert trial is not None
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    with Heartbeat(storage, trial._trial_id, t.heartbeat_s):
        time.sleep(2.6)
        optuna.storages.fail_stale_trials(study)
        assert study.trials[0].state.name == "RUNNING"
    time.sleep(2.6)  # silent for longer than the grace period, as a killed worker is
    retry, _ = next_trial(study, 5, storage)  # fails it, re-queues a copy, hands that out
    assert study.trials[0].state.name == "FAIL"
    assert retry is not None and retry.number == 1
    assert study.trials[1].system_attrs["failed_trial"] == 0
    assert study.trials[1].params == study.trials[0].params
