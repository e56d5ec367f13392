"""The one object that crosses the training process boundary: a run's job, as one JSON argument.

``python -m pipelines.train --job '{"manifest_uri": ..., "run_id": ..., "train": {...}, ...}'``
runs the same way under the local launcher and in every Kubernetes pod. Secrets never travel in
it (pod specs and process lists are readable): each process reads them from its environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from pipelines.config import (
    ENV_PREFIX,
    ConfigError,
    MlflowSettings,
    Settings,
    StoreSettings,
    TrainSettings,
)
from pipelines.redaction import protect

# The variables that carry secrets to a training process: the names load_settings reads them
# from, so one Kubernetes secret serves the Airflow workers and the training pods alike.
STORE_KEY, STORE_SECRET = f"{ENV_PREFIX}STORE__KEY", f"{ENV_PREFIX}STORE__SECRET"
MLFLOW_TOKEN = f"{ENV_PREFIX}MLFLOW__TOKEN"


class TrainJob(BaseModel):
    """Everything a training process needs that is not a secret."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest_uri: str = Field(description="URI of the published data set's manifest.json")
    run_id: str = Field(description="MLflow run that receives metrics, checkpoints and the model")
    train: TrainSettings = Field(description="hyperparameters and topology of the run")
    store: StoreSettings = Field(description="the lake, without its keys (they come from env)")
    mlflow: MlflowSettings = Field(description="the tracking server, without its token (env)")

    @model_validator(mode="after")
    def _no_secrets(self) -> TrainJob:
        if self.store.key or self.store.secret or self.mlflow.token:
            raise ValueError(
                "a training job never carries secrets; they reach each process through "
                f"{STORE_KEY}, {STORE_SECRET} and {MLFLOW_TOKEN}"
            )
        return self

    @classmethod
    def for_run(cls, settings: Settings, manifest_uri: str, run_id: str) -> TrainJob:
        """The job of one MLflow run under these settings, its secrets left out."""
        return cls(
            manifest_uri=manifest_uri,
            run_id=run_id,
            train=settings.train,
            store=settings.store.model_copy(update={"key": None, "secret": None}),
            mlflow=settings.mlflow.model_copy(update={"token": None}),
        )

    def argv(self) -> list[str]:
        """The arguments of ``python -m pipelines.train`` that carry this job."""
        return ["--job", self.model_dump_json()]

    def with_secrets(self, environ: Mapping[str, str]) -> tuple[StoreSettings, MlflowSettings]:
        """The store and MLflow settings of this job with the secrets from ``environ`` (unset
        ones stay None: botocore's chain and ``MLFLOW_TRACKING_TOKEN`` then apply). The values
        are registered for redaction: no log record of this process shows them."""
        key, secret, token = (
            environ.get(n) or None for n in (STORE_KEY, STORE_SECRET, MLFLOW_TOKEN)
        )
        protect(key, secret, token)
        store = self.store.model_copy(update={"key": _secret(key), "secret": _secret(secret)})
        return store, self.mlflow.model_copy(update={"token": _secret(token)})


def secret_env(settings: Settings) -> dict[str, str]:
    """The settings' secrets as the variables a training process reads them from (the local
    launcher puts them in its agents' environment; on Kubernetes ``train.secret_env`` does)."""
    pairs = {
        STORE_KEY: settings.store.key,
        STORE_SECRET: settings.store.secret,
        MLFLOW_TOKEN: settings.mlflow.token,
    }
    return {name: v.get_secret_value() for name, v in pairs.items() if v is not None}


def parse_job(argv: list[str] | None = None) -> TrainJob:
    """The job from the command line; an invalid one names the fields, never their values."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.train", description="One node's training process (torchrun)."
    )
    p.add_argument("--job", required=True, help="the TrainJob as JSON (TrainJob.argv)")
    text = p.parse_args(argv).job
    try:
        return TrainJob.model_validate_json(text)
    except ValidationError as exc:
        fields = "\n".join(
            f"  {'.'.join(str(part) for part in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"Invalid training job (--job):\n{fields}") from None


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None
