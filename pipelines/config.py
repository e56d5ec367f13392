"""Typed settings: a YAML profile (``local`` by default), an optional user YAML, then environment.

Precedence, lowest first: ``pipelines/profiles/<profile>.yaml`` -> the file named by
``MLOPS_CONFIG`` -> ``MLOPS__SECTION__FIELD=value`` environment variables.
``${MLOPS_HOME}`` in any string is replaced by the resolved home (default ``./.mlops``).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROFILES_DIR = Path(__file__).parent / "profiles"
ENV_PREFIX = "MLOPS__"


class ConfigError(ValueError):
    """Raised when configuration cannot be loaded or does not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoreSettings(_Section):
    root: str = Field(description="fsspec URI of the lake root: file:///... or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto, ...); None = AWS")
    region: str | None = Field(None, description="S3 region name")
    key: str | None = Field(None, description="S3 access key id; prefer env/secret over YAML")
    secret: str | None = Field(None, description="S3 secret access key; prefer env/secret")
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="server-side encryption")
    sse_kms_key_id: str | None = Field(None, description="KMS key id when sse is aws:kms")


class MlflowSettings(_Section):
    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///... or http://...)")
    registry_uri: str | None = Field(None, description="registry URI; None = tracking_uri")
    experiment: str = Field("mlops_training_pipeline", description="experiment for training runs")
    artifact_root: str | None = Field(None, description="artifact location for a new experiment")
    model_name: str = Field("fraud_detector", description="registered model name")


class DataSettings(_Section):
    dataset: str = Field("transactions", description="dataset spec name (pipelines/data/specs)")
    spec_dir: str | None = Field(None, description="extra directory searched for dataset specs")
    rows_per_day: int = Field(20000, ge=1, description="rows the generator writes per day")
    shard_target_rows: int = Field(4000, ge=1, description="target rows per parquet shard")
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test fractions of entities (hash split)"
    )


class TrainSettings(_Section):
    launcher: Literal["local", "kubernetes"] = Field("local", description="how nodes are started")
    nodes: int = Field(2, ge=1, description="number of nodes (torchrun agents or pods)")
    procs_per_node: int = Field(1, ge=1, description="worker processes per node")
    epochs: int = Field(6, ge=1, description="passes over the training split")
    batch_size: int = Field(256, ge=1, description="per-process batch size")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate")
    hidden: tuple[int, ...] = Field((64, 32), description="hidden layer widths of the MLP")
    embedding_dim: int = Field(4, ge=1, description="width of each categorical embedding")
    seed: int = Field(7, description="seed for init, shuffling and dropout")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    sync: Literal["ddp", "local_sgd"] = Field(
        "ddp", description="ddp: all-reduce every step; local_sgd: average every sync_every steps"
    )
    sync_every: int = Field(8, ge=1, description="local SGD: steps between parameter averaging")
    max_restarts: int = Field(2, ge=0, description="torchrun --max-restarts")
    min_nodes: int | None = Field(
        None, ge=1, description="elastic lower bound (--nnodes=MIN:MAX); None = fixed size"
    )
    rdzv_port: int = Field(0, ge=0, description="c10d rendezvous port on 127.0.0.1; 0 = free port")
    image: str = Field("mlops-trainer:latest", description="trainer image (kubernetes launcher)")
    namespace: str = Field("mlops", description="Kubernetes namespace for training pods")
    service_account: str = Field("mlops-trainer", description="service account of training pods")
    cpu: str = Field("2", description="cpu request and limit per training pod")
    memory: str = Field("8Gi", description="memory request and limit per training pod")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per training pod (0 = CPU, gloo)")
    node_selector: dict[str, str] = Field({}, description="node selector of training pods")
    tolerations: list[dict[str, str]] = Field([], description="tolerations of training pods")
    secret_env: list[str] = Field(
        [], description="Kubernetes secrets whose keys become env vars (S3, MLflow credentials)"
    )
    pod_rdzv_port: int = Field(29500, description="rendezvous port on the rank-0 pod")
    priority_class: str = Field(
        "mlops-training", description="PriorityClass of training pods (the quota is scoped to it)"
    )
    run_as_user: int = Field(10001, ge=1, description="non-root uid of the trainer image")


class EvaluateSettings(_Section):
    min_auc: float = Field(0.75, description="absolute ROC-AUC floor for any candidate")
    max_auc_regression: float = Field(
        0.02, description="largest AUC drop vs champion allowed, judged on the CI lower bound"
    )
    bootstrap_samples: int = Field(200, ge=10, description="paired bootstrap resamples")
    threshold: float = Field(0.5, description="operating threshold for precision/recall")


class ServingSettings(_Section):
    mode: Literal["local", "remote"] = Field("local", description="start a local server or use url")
    url: str | None = Field(None, description="TF Serving REST base URL when mode=remote")
    host: str = Field("127.0.0.1", description="bind address of the local server")
    rest_port: int = Field(8501, ge=0, description="REST port (TF Serving default 8501; 0 = free)")
    grpc_port: int = Field(8500, ge=0, description="gRPC port (TF Serving default 8500; 0 = free)")
    base_dir: str = Field(description="local directory holding <model>/<version>/ and the config")
    poll_seconds: float = Field(1.0, gt=0, description="model config file poll interval")
    load_timeout_s: float = Field(300.0, gt=0, description="wait for AVAILABLE before failing")
    latency_budget_ratio: float = Field(
        3.0, gt=0, description="infra validation: candidate p99 may be at most this x champion p99"
    )
    latency_budget_ms: float = Field(250.0, gt=0, description="infra validation: absolute p99")


class CanarySettings(_Section):
    steps: tuple[int, ...] = Field((5, 25, 50, 100), description="canary traffic weights in %")
    min_samples: int = Field(50, ge=1, description="canary requests a window needs to judge")
    windows_per_step: int = Field(1, ge=1, description="judged windows at each weight")
    replay_rate: float = Field(400.0, gt=0, description="replayed requests per second (local)")
    replay_concurrency: int = Field(4, ge=1, description="concurrent replay clients")
    min_success_rate: float = Field(0.99, description="critical: canary 2xx share per window")
    max_p99_ms: float = Field(500.0, description="canary p99 latency bound")
    latency_ratio: float = Field(1.10, description="mean latency ratio that counts as slower")
    p_value: float = Field(0.02, description="significance for Mann-Whitney and Fisher tests")
    error_min_diff: float = Field(0.005, description="minimum error-rate difference that counts")
    psi_block: float = Field(0.2, description="score PSI at or above which drift counts")
    ks_alpha: float = Field(0.05, description="KS p-value threshold for score drift")
    failure_limit: int = Field(3, ge=1, description="failed checks that trigger rollback")
    admin_token: str = Field("change-me", description="router admin token (secret in prod)")


class Settings(_Section):
    profile: str = Field("local", description="profile name the settings were built from")
    home: str = Field(description="MLOPS_HOME: all local state lives here")
    store: StoreSettings
    mlflow: MlflowSettings
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    serving: ServingSettings
    canary: CanarySettings = CanarySettings()


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _expand(value: Any, home: str) -> Any:
    if isinstance(value, str):
        return value.replace("${MLOPS_HOME}", home)
    if isinstance(value, dict):
        return {k: _expand(v, home) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, home) for v in value]
    return value


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``MLOPS__TRAIN__NODES=3`` -> {"train": {"nodes": 3}}; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    return data


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build settings from the profile named by ``MLOPS_PROFILE`` (default ``local``)."""
    env = dict(os.environ if environ is None else environ)
    profile = env.get("MLOPS_PROFILE", "local")
    home = str(Path(env.get("MLOPS_HOME", ".mlops")).expanduser().resolve())
    profile_file = PROFILES_DIR / f"{profile}.yaml"
    if not profile_file.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"Unknown profile {profile!r} (MLOPS_PROFILE); known: {known}.")
    data = _read_yaml(profile_file)
    if env.get("MLOPS_CONFIG"):
        data = _deep_merge(data, _read_yaml(Path(env["MLOPS_CONFIG"])))
    data = _deep_merge(data, _env_overrides(env))
    data = _expand(data, home)
    data["profile"], data["home"] = profile, home
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"Invalid configuration for profile {profile!r}:\n{exc}") from exc


@cache
def settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return load_settings()


def with_overrides(base: Settings, **sections: dict[str, Any]) -> Settings:
    """Return a copy with per-run overrides, e.g. ``with_overrides(s, train={"epochs": 1})``."""
    data = _deep_merge(base.model_dump(), sections)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"Invalid run overrides {sections}:\n{exc}") from exc
