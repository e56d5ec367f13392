"""What a tuning worker needs, as one JSON argument: the same line runs as a subprocess of
``mlops tune`` and in a Kubernetes pod. Secrets (the storage URL, S3 keys, the MLflow token)
never travel in it; each process reads them from its environment."""

from __future__ import annotations

import argparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.config import (
    ConfigError,
    MlflowSettings,
    Settings,
    StoreSettings,
    TrainSettings,
    TuningSettings,
)


class TuneJob(BaseModel):
    """One worker of one study."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study: str = Field(description="Optuna study name (created by create_study)")
    manifest_uri: str = Field(description="the published data set every trial trains on")
    parent_run_id: str = Field(description="MLflow tuning run the trials nest under")
    worker: int = Field(ge=0, description="this worker's index (seeds its sampler)")
    colocated: int = Field(1, ge=1, description="workers sharing this machine's cores")
    tuning: TuningSettings = Field(description="search space, sampler, pruner, heartbeats")
    train: TrainSettings = Field(description="the base training settings trials override")
    store: StoreSettings = Field(description="the lake, without its keys (env)")
    mlflow: MlflowSettings = Field(description="the tracking server, without its token (env)")

    @model_validator(mode="after")
    def _no_secrets(self) -> TuneJob:
        if self.tuning.storage or self.store.key or self.store.secret or self.mlflow.token:
            raise ValueError("a tuning job never carries secrets; they come from the environment")
        return self

    @classmethod
    def for_worker(
        cls,
        settings: Settings,
        study: str,
        manifest_uri: str,
        parent_run_id: str,
        worker: int,
        colocated: int,
    ) -> TuneJob:
        return cls(
            study=study,
            manifest_uri=manifest_uri,
            parent_run_id=parent_run_id,
            worker=worker,
            colocated=colocated,
            tuning=settings.tuning.model_copy(update={"storage": None}),
            train=settings.train,
            store=settings.store.model_copy(update={"key": None, "secret": None}),
            mlflow=settings.mlflow.model_copy(update={"token": None}),
        )

    def argv(self) -> list[str]:
        """The arguments of ``python -m pipelines.tune`` that carry this job."""
        return ["--job", self.model_dump_json()]


def parse_job(argv: list[str] | None = None) -> TuneJob:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.tune", description="One tuning worker: trials until the budget."
    )
    p.add_argument("--job", required=True, help="the TuneJob as JSON (TuneJob.argv)")
    text = p.parse_args(argv).job
    try:
        return TuneJob.model_validate_json(text)
    except ValidationError as exc:
        fields = "\n".join(
            f"  {'.'.join(str(part) for part in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"Invalid tuning job (--job):\n{fields}") from None
