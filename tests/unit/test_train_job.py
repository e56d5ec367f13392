"""The training job: one JSON argument across the process boundary, secrets never in it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.config import ConfigError, Settings, load_settings, with_overrides
from pipelines.train.job import (
    MLFLOW_TOKEN,
    STORE_KEY,
    STORE_SECRET,
    TrainJob,
    parse_job,
    secret_env,
)

KEY, SECRET, TOKEN = "AKIA7Q2EXAMPLE", "wJalr9XUtnFEMIK7MDENG", "tok-3f9a1c77e2"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = load_settings({"MLOPS_HOME": str(tmp_path)})
    return with_overrides(
        s,
        train={"epochs": 9, "hidden": [16, 8], "sync": "local_sgd", "dist_timeout_s": 42},
        store={"key": KEY, "secret": SECRET},
        mlflow={"token": TOKEN, "experiment": "exp-7"},
    )


def test_the_job_is_one_argument_that_walks_the_settings_across_unchanged(
    settings: Settings,
) -> None:
    job = TrainJob.for_run(settings, "file:///lake/manifest.json", "run-1")
    argv = job.argv()
    assert argv[0] == "--job" and len(argv) == 2
    again = parse_job(argv)
    assert again == job
    # A straight walk: the worker sees the settings' own typed values, not rebuilt strings.
    assert again.train == settings.train
    assert (again.train.epochs, again.train.hidden) == (9, (16, 8))
    assert again.train.dist_timeout_s == 42.0
    assert again.mlflow.experiment == "exp-7" and again.store.root == settings.store.root


def test_secrets_never_travel_in_the_job(settings: Settings) -> None:
    argv = TrainJob.for_run(settings, "file:///lake/manifest.json", "run-1").argv()
    for value in (KEY, SECRET, TOKEN):
        assert value not in " ".join(argv)
    with pytest.raises(ValueError, match="never carries secrets"):
        TrainJob(
            manifest_uri="m",
            run_id="r",
            train=settings.train,
            store=settings.store,
            mlflow=settings.mlflow.model_copy(update={"token": None}),
        )


def test_each_process_joins_the_job_with_secrets_from_its_environment(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    job = TrainJob.for_run(settings, "file:///lake/manifest.json", "run-1")
    env = secret_env(settings)
    assert env == {STORE_KEY: KEY, STORE_SECRET: SECRET, MLFLOW_TOKEN: TOKEN}
    store, mlflow = job.with_secrets(env)
    assert store == settings.store and mlflow == settings.mlflow
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("key %s", KEY)
    assert KEY not in caplog.text  # registered for redaction in this process
    # Unset secrets stay unset (botocore's chain and MLFLOW_TRACKING_TOKEN then apply).
    bare_store, bare_mlflow = job.with_secrets({})
    assert bare_store.key is None and bare_store.secret is None and bare_mlflow.token is None


def test_an_invalid_job_names_the_field_and_not_its_value(settings: Settings) -> None:
    job = TrainJob.for_run(settings, "file:///lake/manifest.json", "run-1")
    bad = job.model_dump_json().replace('"epochs":9', '"epochs":-123456')
    with pytest.raises(ConfigError, match=r"train\.epochs") as err:
        parse_job(["--job", bad])
    assert "-123456" not in str(err.value)
    with pytest.raises(ConfigError, match="Invalid training job"):
        parse_job(["--job", "{not json"])
