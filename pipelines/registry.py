"""MLflow adapter: experiment runs, artifacts, registered model versions and aliases."""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.config import MlflowSettings

log = logging.getLogger(__name__)

TAG_PREFIX = "mlops."
CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(RuntimeError):
    """An MLflow lookup or write failed."""


class RunNotFound(RegistryError):
    """A run id that the tracking server does not know (bad input, not a failure)."""


def code_version(configured: str | None) -> str:
    """The code version: ``mlflow.code_version`` (images set it at build time), else the
    checkout's git HEAD, else ``unknown``."""
    if configured:
        return configured
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


@contextmanager
def _sqlite_lock(uri: str) -> Iterator[bool]:
    """MLflow creates and migrates a SQLite file's tables when a client first opens it, and
    two processes doing that at once fail ("table ... already exists", "online migration
    expected to match one row"): a task and the test watching it, mapped tasks starting
    together. Opening is serialised by an inter-process lock beside the file."""
    if not uri.startswith("sqlite:///"):
        yield False
        return
    import fasteners

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with fasteners.InterProcessLock(str(db) + ".lock"):
        yield True


class Registry:
    def __init__(self, cfg: MlflowSettings):
        import mlflow
        from mlflow.tracking import MlflowClient

        from pipelines.tls import export_mlflow_tls

        self.cfg = cfg
        export_mlflow_tls(cfg)  # MLflow reads its CA, client cert and token from the environment
        mlflow.set_tracking_uri(cfg.tracking_uri)
        if cfg.registry_uri:
            mlflow.set_registry_uri(cfg.registry_uri)
        with _sqlite_lock(cfg.tracking_uri) as local:
            self.client = MlflowClient(cfg.tracking_uri, cfg.registry_uri)
            if local:  # the registry store, too, is built on first use
                self.client.search_registered_models(max_results=1)
        self.model_name = cfg.model_name

    # -- runs ---------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        """The experiment's id, created on first use. Two processes may both find it missing
        (a task and its retry, a test and the task it watches): the loser reads the winner's."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(
                self.client.create_experiment(
                    self.cfg.experiment, artifact_location=self.artifact_location()
                )
            )
        except MlflowException as exc:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            log.info("experiment %s was created concurrently (%s)", self.cfg.experiment, exc)
            return str(exp.experiment_id)

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts. A tracking server is given no local path
        (other clients and pods could not read it): it uses its own default, which with
        ``mlflow server --serve-artifacts`` is the proxied ``mlflow-artifacts:/`` root."""
        root = self.cfg.artifact_root
        remote = self.cfg.tracking_uri.startswith(("http://", "https://"))
        if root and remote and ("://" not in root or root.startswith("file:")):
            log.warning(
                "mlflow.artifact_root %s is a local path but the tracking server %s is remote; "
                "using the server's artifact root instead",
                root,
                self.cfg.tracking_uri,
            )
            return None
        return root

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
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RunNotFound(f"MLflow run {run_id!r} does not exist.") from None
            raise RegistryError(f"MLflow run {run_id!r} could not be read: {exc}") from exc
        except Exception as exc:
            raise RegistryError(f"MLflow run {run_id!r} could not be read: {exc}") from exc

    def run_tag(self, run_id: str, key: str) -> str | None:
        return self.get_run(run_id).data.tags.get(f"{TAG_PREFIX}{key}")

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, f"{TAG_PREFIX}{k}", str(v))

    def delete_tags(self, run_id: str, keys: list[str]) -> None:
        """Remove ``mlops.<key>`` tags that the run has (absent ones are skipped)."""
        present = self.get_run(run_id).data.tags
        for k in keys:
            if f"{TAG_PREFIX}{k}" in present:
                self.client.delete_tag(run_id, f"{TAG_PREFIX}{k}")

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of a metric, in step order."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        for k, v in params.items():
            self.client.log_param(run_id, k, str(v))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        for k, v in metrics.items():
            self.client.log_metric(run_id, k, float(v), step=step)

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
    def log_pytorch_model(
        self,
        run_id: str,
        model: Any,
        input_example: Any,
        signature: Any,
        tags: dict[str, Any] | None = None,
        name: str = "model",
    ) -> str:
        """Log ``model`` with the torch flavour as a LoggedModel of the run; its model id.

        Idempotent: a READY logged model of that name from the run is reused. The model is
        pickled (a ``TabularMLP`` takes encoded tensors, not the raw frame its signature and
        input example describe, so the ``pt2`` export cannot trace it from that example)."""
        import cloudpickle
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.entities import LoggedModelStatus

        run = self.get_run(run_id)
        exp = run.info.experiment_id
        for lm in self.client.search_logged_models(
            [exp], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
        ):
            if lm.status == LoggedModelStatus.READY:
                return str(lm.model_id)
        # Created here, in the run's experiment: the fluent default would be the active one.
        lm = self.client.create_logged_model(
            experiment_id=exp,
            name=name,
            source_run_id=run_id,
            tags={f"{TAG_PREFIX}{k}": str(v) for k, v in (tags or {}).items()},
            model_type="tabular-mlp",
        )
        # The raw-frame example cannot feed the pyfunc wrapper (it casts frames to float32),
        # so MLflow's serving-input check would only log a misleading warning.
        quiet = logging.getLogger("mlflow.models.model")
        mute = _DropMessage("Failed to validate serving input example")
        quiet.addFilter(mute)
        try:
            mlflow.pytorch.log_model(
                model,
                name=name,
                run_id=run_id,
                model_id=lm.model_id,
                signature=signature,
                input_example=input_example,
                serialization_format="pickle",
                # Pinned here: inferring requirements loads the model in a subprocess (slow).
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"cloudpickle=={cloudpickle.__version__}",
                    f"mlflow=={mlflow.__version__}",
                ],
            )
        finally:
            quiet.removeFilter(mute)
        return str(lm.model_id)

    def run_version(self, run_id: str) -> str | None:
        """The version registered from a run, if any (registration is idempotent per run)."""
        existing = self.client.search_model_versions(
            f"name = '{self.model_name}' and run_id = '{run_id}'"
        )
        return str(existing[0].version) if existing else None

    def register(self, run_id: str, tags: dict[str, Any], model_id: str) -> str:
        """A new model version whose source is the run's logged model (idempotent per run)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(
                self.model_name, description="Fraud classifier trained by mlops_training_pipeline"
            )
        existing = self.run_version(run_id)
        if existing is not None:
            return existing
        mv = self.client.create_model_version(
            self.model_name,
            source=f"models:/{model_id}",
            run_id=run_id,
            model_id=model_id,
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


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)
