"""MLflow adapter: experiment runs, artifacts, registered model versions and aliases."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import MlflowSettings

TAG_PREFIX = "mlops."
CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(RuntimeError):
    """An MLflow lookup or write failed."""


def git_sha() -> str:
    """Code version: ``MLOPS_GIT_SHA`` (set in images) or the checkout's HEAD."""
    if os.environ.get("MLOPS_GIT_SHA"):
        return os.environ["MLOPS_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Registry:
    def __init__(self, cfg: MlflowSettings):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        if cfg.tracking_uri.startswith("sqlite:///"):
            Path(cfg.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        mlflow.set_tracking_uri(cfg.tracking_uri)
        if cfg.registry_uri:
            mlflow.set_registry_uri(cfg.registry_uri)
        self.client = MlflowClient(cfg.tracking_uri, cfg.registry_uri)
        self.model_name = cfg.model_name

    # -- runs ---------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return str(exp.experiment_id)
        return str(
            self.client.create_experiment(
                self.cfg.experiment, artifact_location=self.cfg.artifact_root
            )
        )

    def find_run(self, run_key: str) -> Any | None:
        """The latest run tagged with an idempotency key (a DAG run + task), if any."""
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{TAG_PREFIX}run_key` = '{run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def create_run(self, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id(),
            run_name=name,
            tags={f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items()},
        )
        return str(run.info.run_id)

    def get_run(self, run_id: str) -> Any:
        try:
            return self.client.get_run(run_id)
        except Exception as exc:
            raise RegistryError(f"MLflow run {run_id!r} not found: {exc}") from exc

    def run_tag(self, run_id: str, key: str) -> str | None:
        return self.get_run(run_id).data.tags.get(f"{TAG_PREFIX}{key}")

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, f"{TAG_PREFIX}{k}", str(v))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        for k, v in params.items():
            self.client.log_param(run_id, k, str(v))

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.client.log_metric(run_id, k, float(v))

    def end_run(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_bytes(self, run_id: str, data: bytes, artifact_path: str, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def read_artifact(self, run_id: str, path: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.client.download_artifacts(run_id, path, tmp)
            except Exception as exc:
                raise RegistryError(f"Run {run_id} has no artifact {path!r}: {exc}") from exc
            return Path(local).read_bytes()

    # -- model registry -----------------------------------------------------------------------
    def register(self, run_id: str, tags: dict[str, Any], artifact_path: str = "model") -> str:
        """A new model version for the run's model artifact (idempotent per run)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(
                self.model_name, description="Fraud classifier trained by mlops_training_pipeline"
            )
        existing = self.client.search_model_versions(
            f"name = '{self.model_name}' and run_id = '{run_id}'"
        )
        if existing:
            return str(existing[0].version)
        source = f"{self.get_run(run_id).info.artifact_uri}/{artifact_path}"
        mv = self.client.create_model_version(
            self.model_name,
            source=source,
            run_id=run_id,
            tags={f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items()},
        )
        return str(mv.version)

    def version(self, version: str | int) -> Any:
        return self.client.get_model_version(self.model_name, str(version))

    def version_run_id(self, version: str | int) -> str:
        return str(self.version(version).run_id)

    def set_version_tags(self, version: str | int, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(
                self.model_name, str(version), f"{TAG_PREFIX}{k}", str(v)
            )

    def alias_version(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model_alias(self.model_name, alias)
        except MlflowException:
            pass

    def aliases(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(self.model_name)
        except MlflowException:
            return {}
        return {a: str(v) for a, v in (rm.aliases or {}).items()}
