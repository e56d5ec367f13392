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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from pipelines.redaction import protect

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
    key: SecretStr | None = Field(None, description="S3 access key id; prefer env/secret over YAML")
    secret: SecretStr | None = Field(None, description="S3 secret access key; prefer env/secret")
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="server-side encryption")
    sse_kms_key_id: str | None = Field(None, description="KMS key id when sse is aws:kms")


class MlflowSettings(_Section):
    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///... or http://...)")
    registry_uri: str | None = Field(None, description="registry URI; None = tracking_uri")
    experiment: str = Field("mlops_training_pipeline", description="experiment for training runs")
    artifact_root: str | None = Field(None, description="artifact location for a new experiment")
    model_name: str = Field("fraud_detector", description="registered model name")
    code_version: str | None = Field(
        None,
        description="code version on MLflow runs and in the training key (images set it at "
        "build time); None = the checkout's git HEAD",
    )
    token: SecretStr | None = Field(
        None, description="bearer token for the tracking server (MLFLOW_TRACKING_TOKEN); env/secret"
    )
    ca_bundle: str | None = Field(
        None, description="PEM CA bundle the tracking server's certificate chains to; None = system"
    )
    client_cert: str | None = Field(
        None, description="PEM client certificate for mTLS (may also hold the private key)"
    )
    client_key: str | None = Field(None, description="PEM private key of client_cert, if separate")
    insecure_skip_verify: bool = Field(
        False, description="do not verify the server certificate (never in production; warns)"
    )

    @model_validator(mode="after")
    def _tls_consistent(self) -> MlflowSettings:
        if self.client_key and not self.client_cert:
            raise ValueError("mlflow.client_key needs mlflow.client_cert")
        if self.insecure_skip_verify and self.ca_bundle:
            raise ValueError("mlflow.insecure_skip_verify and mlflow.ca_bundle exclude each other")
        return self


class DataSettings(_Section):
    dataset: str = Field("transactions", description="dataset spec name (pipelines/data/specs)")
    spec_dir: str | None = Field(None, description="extra directory searched for dataset specs")
    rows_per_day: int = Field(20000, ge=1, description="rows the generator writes per day")
    shard_target_rows: int = Field(
        250_000,
        ge=1,
        description="target rows per parquet shard; small splits are shared by nodes at train time",
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test fractions of entities (hash split)"
    )
    batch_rows: int = Field(
        500_000, ge=1, description="rows per record batch validate and shard hold in memory"
    )
    late_event_tolerance_s: float = Field(
        0.0, ge=0, description="events this long before a partition's day still belong to it"
    )
    workers: int | None = Field(
        None, ge=1, description="shard writer threads; default one per CPU (at most 4)"
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
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout after each hidden layer (0 = none)"
    )
    params_from: Literal["config", "tuning"] = Field(
        "config",
        description="config: these settings; tuning: the best trial of tuning.study (or the "
        "dataset's latest finished study) replaces the tuned fields",
    )
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
    dist_timeout_s: float = Field(
        300.0, gt=0, description="collective timeout: a rank whose peer died fails, not hangs"
    )
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
    group_attempts: int = Field(
        2, ge=1, description="kubernetes: attempts of the whole rank group (never one rank alone)"
    )
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
    threshold_policy: Literal["alert_rate", "target_precision", "fixed"] = Field(
        "alert_rate",
        description="how each version's decision threshold is chosen on its validation rows "
        "(pipelines/evaluate/threshold.py)",
    )
    alert_rate: float = Field(
        0.02, gt=0, lt=1, description="alert_rate policy: share of transactions flagged"
    )
    target_precision: float = Field(
        0.5, gt=0, le=1, description="target_precision policy: validation precision to reach"
    )
    threshold: float = Field(
        0.5, ge=0, le=1, description="fixed policy: the decision threshold as it is"
    )
    slice_min_auc: float | None = Field(
        None, description="ROC-AUC floor for every judged slice; None = only the per-slice ones"
    )
    slice_min_auc_by_slice: dict[str, float] = Field(
        {}, description="per-slice ROC-AUC floors keyed 'column=value' (override slice_min_auc)"
    )
    slice_min_rows: int = Field(200, ge=1, description="rows a slice needs to be judged")
    slice_min_class_rows: int = Field(
        5, ge=1, description="rows of each class a slice needs to be judged (AUC on fewer is noise)"
    )
    slice_max_auc_regression: float | None = Field(
        None, description="largest slice AUC drop vs champion (point estimate); None = not judged"
    )
    behaviour: bool = Field(True, description="run the dataset spec's behavioural tests")
    behaviour_severity: Literal["block", "warn"] = Field(
        "block", description="severity of behavioural tests whose spec entry names none"
    )
    behaviour_rows: int = Field(1000, ge=1, description="test-split rows behavioural tests perturb")
    behaviour_seed: int = Field(0, description="seed of the behavioural tests' perturbations")
    plots: bool = Field(True, description="log ROC, PR, calibration and loss plots to the run")

    @model_validator(mode="after")
    def _slice_keys(self) -> EvaluateSettings:
        for key in self.slice_min_auc_by_slice:
            col, sep, value = key.partition("=")
            if not (sep and col and value):
                raise ValueError(
                    f"evaluate.slice_min_auc_by_slice key {key!r} is not 'column=value'"
                )
        return self


class ServingSettings(_Section):
    mode: Literal["local", "remote"] = Field("local", description="start a local server or use url")
    pool_urls: dict[str, str] = Field(
        {}, description="remote: REST base URL of each TF Serving pool (stable, baseline, canary)"
    )
    host: str = Field("127.0.0.1", description="bind address of the local server")
    rest_port: int = Field(
        8501,
        ge=0,
        description="REST port of the first local replica, the next ones follow (0 = free)",
    )
    grpc_port: int = Field(
        8500, ge=0, description="gRPC port of `mlops serve` (replicas take free ones; 0 = free)"
    )
    base_dir: str = Field(description="local directory holding <model>/<version>/ and the config")
    publish_root: str | None = Field(
        None,
        description="remote TF Serving: URI (s3://...) the controller publishes versions and "
        "models.config to, ahead of the local record",
    )
    model_base_path: str | None = Field(
        None, description="base_path of the model as the remote TF Serving sees it (/models/<m>)"
    )
    inject_export_skew: bool = Field(
        False,
        description="a drill, never for production: export publishes a SavedModel whose first "
        "log-scaled feature is read x100 (a broken preprocessing step that loads and answers) "
        "after parity and infra validation passed; the shadow stage, or the canary without it, "
        "must stop the version (mlops demo --skewed-export)",
    )
    poll_seconds: float = Field(1.0, gt=0, description="model config file poll interval")
    load_timeout_s: float = Field(300.0, gt=0, description="wait for AVAILABLE before failing")
    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        description="the serving lease (one writer at a time: staging, promotion, rollback, "
        "the monitor's restore) expires this long after its holder stops renewing it",
    )
    lease_wait_s: float = Field(
        900.0, ge=0, description="how long a serving change waits for the lease's holder"
    )
    latency_budget_ratio: float = Field(
        3.0, gt=0, description="infra validation: candidate p99 may be at most this x champion p99"
    )
    latency_budget_ms: float = Field(250.0, gt=0, description="infra validation: absolute p99")
    ca_bundle: str | None = Field(
        None, description="PEM CA bundle for https:// serving URLs and gRPC TLS; None = system"
    )
    client_cert: str | None = Field(
        None, description="PEM client certificate for mTLS (REST, gRPC)"
    )
    client_key: str | None = Field(None, description="PEM private key of client_cert")
    grpc_tls: bool = Field(False, description="gRPC clients use TLS (secure_channel) when true")
    enable_batching: bool = Field(
        False,
        description="local server: batch predict requests, as TF Serving's --enable_batching "
        "(production's pods run with it)",
    )
    batching_parameters_file: str | None = Field(
        None,
        description="TF Serving BatchingParameters text proto for enable_batching; None = the "
        "repository's infra/tf-serving/batching.config, the file production mounts",
    )

    @model_validator(mode="after")
    def _tls_consistent(self) -> ServingSettings:
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("serving.client_cert and serving.client_key go together")
        return self


class DataPlaneSettings(_Section):
    """Envoy in front of the model-server replicas (pipelines/serving/dataplane)."""

    host: str = Field("127.0.0.1", description="bind address of the local Envoy's listeners")
    port: int = Field(8601, ge=0, description="client listener: TF Serving's REST paths (0 = free)")
    admin_port: int = Field(9901, ge=0, description="Envoy admin, loopback only (0 = free)")
    shadow_port: int = Field(
        8602, ge=0, description="internal listener that records mirrored requests (0 = free)"
    )
    replicas: int = Field(2, ge=1, description="local model-server replicas per pool")
    url: str | None = Field(
        None, description="the data plane's client URL when serving.mode is remote"
    )
    split_configmap: str = Field(
        "mlops-traffic-split",
        description="remote: ConfigMap holding the split (Envoy's runtime disk layer)",
    )
    namespace: str = Field("mlops", description="remote: namespace of the split ConfigMap")
    split_propagation_s: float = Field(
        90.0, ge=0, description="remote: wait after patching the split (kubelet volume sync)"
    )
    evidence_uri: str | None = Field(
        None, description="remote: fsspec URI of the JSON access-log lines a collector ships"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body limit (413 above)")
    request_timeout_s: float = Field(10.0, gt=0, description="route timeout of a request")
    retries: int = Field(2, ge=0, description="retries on connect failure or reset, other replica")
    health_interval_s: float = Field(1.0, gt=0, description="active health check interval")
    eject_after_5xx: int = Field(3, ge=1, description="consecutive 5xx that eject a replica")
    ejection_s: float = Field(5.0, gt=0, description="base ejection time of an outlier")
    log_flush_ms: int = Field(200, ge=10, description="access-log flush interval")
    heartbeat_s: float = Field(
        10.0,
        ge=0,
        description="Envoy checks its own listener this often, a line in the access log each "
        "time: what tells an hour without traffic from an hour whose log never arrived (0 = off)",
    )
    concurrency: int = Field(1, ge=1, description="Envoy worker threads (--concurrency)")
    start_timeout_s: float = Field(120.0, gt=0, description="wait for replicas and Envoy")


class ShadowSettings(_Section):
    """The shadow stage: stable's traffic mirrored to the staged candidate, answers compared."""

    enabled: bool = Field(True, description="run shadow_candidate before the canary")
    percent: int = Field(100, ge=1, le=100, description="share of stable's requests mirrored")
    requests: int = Field(400, ge=10, description="replayed requests (local runs)")
    window_seconds: float = Field(120.0, gt=0, description="window length with live traffic")
    min_pairs: int = Field(200, ge=1, description="stable/shadow answers joined to judge")
    agreement_tolerance: float = Field(
        0.01,
        ge=0,
        le=1,
        description="live decision agreement may fall this far below evaluation's expected one "
        "before the test counts it (fails only when significantly below)",
    )
    max_score_diff: float = Field(
        0.02,
        ge=0,
        description="added to evaluation's p99 |score difference| + the noise floor's: more "
        "than 1 % of live pairs beyond it (significantly) fails",
    )
    rank_tolerance: float = Field(
        0.05,
        ge=0,
        le=2,
        description="live rank correlation may fall this far below evaluation's expected one "
        "(fails only when significantly below)",
    )
    alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="false-fail rate of the three tests against evaluation's expectation "
        "(agreement, score-difference tail, rank correlation), a third each",
    )
    max_error_rate: float = Field(0.01, ge=0, le=1, description="non-2xx share of shadow answers")
    latency_ratio: float = Field(
        2.0, gt=0, description="shadow p50 over stable p50 that fails (the mirror adds a hop)"
    )
    noise_requests: int = Field(100, ge=1, description="requests sent to two stable replicas")
    latency_windows: int = Field(
        2,
        ge=1,
        description="windows in a row the latency check must fail, all else passing, to fail",
    )


class CanarySettings(_Section):
    steps: tuple[int, ...] = Field((5, 25, 50, 100), description="canary traffic weights in %")
    min_samples: int = Field(50, ge=1, description="canary requests a window needs to judge")
    windows_per_step: int = Field(1, ge=1, description="judged windows at each weight")
    replay_rate: float = Field(400.0, gt=0, description="replayed requests per second (local)")
    replay_concurrency: int = Field(4, ge=1, description="concurrent replay clients")
    min_success_rate: float = Field(0.99, description="critical: canary 2xx share per window")
    success_alpha: float = Field(
        0.01, description="success rate is critical when significantly below the floor (p <)"
    )
    max_p99_ms: float = Field(500.0, description="canary p99 latency bound")
    latency_ratio: float = Field(1.10, description="mean latency ratio that counts as slower")
    p_value: float = Field(0.02, description="significance for Mann-Whitney and Fisher tests")
    error_min_diff: float = Field(0.005, description="minimum error-rate difference that counts")
    psi_block: float = Field(0.2, description="score PSI at or above which drift counts")
    ks_alpha: float = Field(0.05, description="KS p-value threshold for score drift")
    failure_limit: int = Field(
        3, ge=1, description="failed checks that trigger rollback (sequential: p99 windows)"
    )
    replay: bool = Field(True, description="send held-out rows through the data plane (local runs)")
    window_seconds: float = Field(60.0, gt=0, description="window length with live traffic")
    poke_interval_s: float = Field(2.0, gt=0, description="monitor_canary sensor poke interval")
    sensor_mode: Literal["reschedule", "poke"] = Field(
        "poke",
        description="monitor_canary's sensor mode: poke keeps one task process in the "
        "mlops_sensors pool for the analysis; reschedule frees the worker slot between pokes but "
        "the scheduler can fail a rescheduled sensor on a stale executor event "
        "(apache/airflow#71172), so a canary then ends without a verdict",
    )
    sensor_retries: int = Field(
        3,
        ge=0,
        description="monitor_canary attempts after the first; each resumes the analysis from its "
        "state in the lake (a killed worker costs the window in flight, not the evidence)",
    )
    timeout_s: float = Field(
        3600.0, gt=0, description="the analysis rolls back (a verdict) this long after it began"
    )
    seed: int = Field(0, description="replay order and routing salt of the local traffic replay")
    judge: Literal["sequential", "windowed"] = Field(
        "sequential",
        description="sequential: anytime-valid evidence over the whole analysis (alpha, margins, "
        "budget below); windowed: each window judged alone (judge_window + failure_limit)",
    )
    alpha: float = Field(
        0.002,
        gt=0,
        lt=1,
        description="sequential: false-rollback bound of a whole analysis, however often it looks "
        "(split over errors, latency and scores; 0.01 gains 3 points of power on errors and "
        "rolls back about 1 healthy canary in 150)",
    )
    promote_alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="sequential: chance that a canary beyond a margin on a metric promotes early",
    )
    error_margin: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="sequential: non-inferiority margin on canary minus stable error rate",
    )
    latency_margin: float = Field(
        0.15,
        gt=0,
        description="sequential: non-inferiority margin on the canary/baseline latency ratio - 1, "
        "requests matched in time buckets",
    )
    score_margin: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="sequential: allowed |P(canary score > stable score) - expected|, the expected "
        "value being evaluation's for the pair (1/2 for one model against itself)",
    )
    max_canary_requests: int = Field(
        1000,
        ge=1,
        description="sequential: analysis budget; at it, promote only if every estimate is "
        "within its margin",
    )
    bucket_seconds: float = Field(
        0.1,
        gt=0,
        description="sequential: canary and stable requests are compared within time buckets this "
        "long, so a machine-wide slowdown cancels",
    )
    replica_min_pairs: int = Field(
        30,
        ge=1,
        description="sequential: latency rolls back only when each canary replica and each "
        "baseline replica with at least this many matched requests shows the canary slower too "
        "(a slow version is slow on every replica; a slow process is one)",
    )


class PostgresSettings(_Section):
    """The PostgreSQL the project starts itself when one is needed locally (pipelines/postgres.py:
    `mlops airflow`'s metadata DB); its data lives in MLOPS_HOME/postgres."""

    port: int = Field(0, ge=0, le=65535, description="its loopback port (0 = any free port)")


# The trainer's settings a study may search (the rest is topology and deployment).
TUNABLE = ("lr", "batch_size", "epochs", "hidden", "dropout", "embedding_dim")


class SearchParam(_Section):
    """One dimension of the search space: a float or int range, or a list of choices."""

    kind: Literal["float", "int", "categorical"] = Field(description="how Optuna samples it")
    low: float | None = Field(None, description="float/int: lowest value (inclusive)")
    high: float | None = Field(None, description="float/int: highest value (inclusive)")
    log: bool = Field(False, description="float/int: sample on a log scale (low > 0)")
    step: float | None = Field(None, description="float/int: grid step; None = continuous / 1")
    choices: list[Any] | None = Field(None, description="categorical: the values to choose from")


def _default_space() -> dict[str, SearchParam]:
    return {
        "lr": SearchParam(kind="float", low=3e-4, high=3e-2, log=True),
        "hidden": SearchParam(kind="categorical", choices=[[32], [64, 32], [128, 64]]),
        "dropout": SearchParam(kind="float", low=0.0, high=0.3),
        "batch_size": SearchParam(kind="categorical", choices=[64, 128, 256]),
        # epochs is not searched: every trial plans train.epochs, and Hyperband (the default
        # pruner) cuts it; a searched epoch count hides good short trials from the pruner and
        # caps what it can save (bench/tuning.py, docs/benchmarks.md).
        "embedding_dim": SearchParam(kind="int", low=2, high=8),
    }


class TuningSettings(_Section):
    """Hyperparameter tuning (pipelines/tune): one Optuna study on PostgreSQL, W workers."""

    storage: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL of the study's PostgreSQL (env MLOPS__TUNING__STORAGE from "
        "a secret); None = the local PostgreSQL in MLOPS_HOME/postgres",
    )
    storage_conn_id: str | None = Field(
        None,
        description="Airflow connection holding the storage URL (DAG tasks; env AIRFLOW_CONN_*)",
    )
    database: str = Field("optuna", description="database of the local PostgreSQL for studies")
    study: str | None = Field(
        None, description="study whose best trial train.params_from=tuning uses; None = latest"
    )
    experiment: str = Field("mlops_tuning", description="MLflow experiment of tuning runs")
    trials: int = Field(20, ge=1, description="trial budget of a study (complete + pruned)")
    workers: int = Field(2, ge=1, description="parallel workers pulling trials from the study")
    threads: int | None = Field(
        None, ge=1, description="torch threads per worker; None = cores // workers on a machine"
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="tpe: Bayesian; random: baseline")
    seed: int = Field(0, description="sampler seed")
    startup_trials: int = Field(5, ge=1, description="TPE: random trials before it models")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "hyperband",
        description="early stopping of trials on each epoch's validation loss (hyperband: "
        "epochs are its resource, 1 to the trials' planned epochs)",
    )
    warmup_epochs: int = Field(1, ge=0, description="median: epochs before a trial can be pruned")
    prune_startup_trials: int = Field(
        3, ge=0, description="median: finished trials before any is pruned"
    )
    heartbeat_s: int = Field(10, ge=1, description="seconds between a running trial's heartbeats")
    grace_s: int = Field(
        30, ge=1, description="a trial without a heartbeat this long is failed and retried"
    )
    max_retry: int = Field(2, ge=0, description="retries of a trial whose worker died")
    poll_s: float = Field(1.0, gt=0, description="wait of an idle worker for others' trials")
    space: dict[str, SearchParam] = Field(
        default_factory=_default_space,
        description=f"search space by train setting; keys among {', '.join(TUNABLE)}",
    )

    @model_validator(mode="after")
    def _space_valid(self) -> TuningSettings:
        if not self.space:
            raise ValueError("tuning.space is empty: declare at least one train setting to search")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError("tuning.grace_s must be longer than tuning.heartbeat_s")
        for name, p in self.space.items():
            _check_search_param(f"tuning.space.{name}", name, p)
        return self


def _check_search_param(where: str, name: str, p: SearchParam) -> None:
    """Refuse a dimension the trainer cannot take, naming it (``where``)."""
    if name not in TUNABLE:
        raise ValueError(f"{where}: {name!r} is not a tunable train setting ({', '.join(TUNABLE)})")
    if p.kind == "categorical":
        if not p.choices:
            raise ValueError(f"{where}: a categorical dimension needs a non-empty choices list")
        values = list(p.choices)
        if name == "hidden" and not all(
            isinstance(c, list) and c and all(isinstance(w, int) and w >= 1 for w in c)
            for c in values
        ):
            raise ValueError(f"{where}: each choice must be a list of layer widths >= 1")
    else:
        if p.low is None or p.high is None or p.low > p.high:
            raise ValueError(f"{where}: its {p.kind} range needs low <= high")
        if p.log and p.low <= 0:
            raise ValueError(f"{where}: a log-scale range needs low > 0")
        if p.log and p.step is not None:
            raise ValueError(f"{where}: a log-scale range takes no step")
        if name == "hidden":
            raise ValueError(f"{where}: hidden takes layer lists; declare it categorical")
        if p.kind == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
            raise ValueError(f"{where}: an int range needs whole low and high")
        values = [p.low, p.high]
    for value in values:
        try:
            TrainSettings.model_validate({name: value})
        except ValidationError as exc:
            msg = exc.errors(include_input=False, include_url=False)[0]["msg"]
            raise ValueError(
                f"{where}: value {value!r} is not a valid train.{name}: {msg}"
            ) from None


class BatchSettings(_Section):
    """Batch scoring (pipelines/batch): a day's landing partition scored by the champion's
    exported artifact, in chunks of row groups, outputs published under a manifest."""

    chunk_rows: int = Field(
        500_000,
        ge=1,
        description="target rows per chunk (whole parquet row groups; a chunk never spans files)",
    )
    workers: int = Field(1, ge=1, description="local worker processes of `mlops score`")
    runtime: Literal["auto", "savedmodel", "onnx"] = Field(
        "auto",
        description="auto = the model version's batch_runtime tag (the optimisation gate's "
        "choice), else the SavedModel",
    )
    threads: int | None = Field(
        None, ge=1, description="runtime threads per worker; None = the cores shared by workers"
    )


class MonitoringSettings(_Section):
    """Production monitoring (pipelines/monitoring, DAG mlops_model_monitoring): each hour's
    serving log against SLOs, the champion's training reference and matured labels, and the
    action each finding takes."""

    ship_delay_s: float = Field(
        60.0,
        ge=0,
        description="wait after an hour ends before shipping it: the log flush, the longest "
        "request (logged when it ends, stamped when it began), a log collector's upload",
    )
    min_requests: int = Field(
        200,
        ge=1,
        description="an hour's requests before its SLOs are judged (and its rows before drift)",
    )
    slo_error_rate: float = Field(
        0.01, ge=0, le=1, description="SLO: share of non-2xx answers per version and hour"
    )
    slo_p50_ms: float = Field(100.0, gt=0, description="SLO: median latency per version and hour")
    slo_p99_ms: float = Field(500.0, gt=0, description="SLO: p99 latency per version and hour")
    feature_psi: float = Field(
        0.1,
        gt=0,
        description="feature PSI vs the champion's training reference that is drift (numbers: "
        "with KS agreeing); the data gate blocks a batch only at the spec's psi_block",
    )
    prediction_psi: float = Field(
        0.2, gt=0, description="score PSI vs the champion's evaluation-time scores that is drift"
    )
    drift_hours: int = Field(
        2, ge=1, description="monitored hours in a row with drift before it counts as sustained"
    )
    label_window_days: int = Field(
        14, ge=1, description="trailing days of matured labels judged for realised performance"
    )
    label_delay_days: int = Field(
        30,
        ge=0,
        description="most days between a request and its label landing (served days searched)",
    )
    min_labels: int = Field(200, ge=1, description="matured labels needed to judge performance")
    max_auc_drop: float = Field(
        0.05, ge=0, description="realised ROC-AUC this far below evaluation's is decayed"
    )
    max_precision_drop: float = Field(
        0.15, ge=0, description="realised precision this far below evaluation's is decayed"
    )
    rollback_within_hours: float = Field(
        24.0, ge=0, description="an SLO breach this soon after a promotion rolls back"
    )
    retrain_cooldown_hours: float = Field(
        24.0, ge=0, description="no second retraining trigger within this time of the last"
    )
    experiment: str = Field(
        "mlops_monitoring", description="MLflow experiment of the monitoring runs (one per day)"
    )
    alert_webhook: SecretStr | None = Field(
        None,
        description="incoming-webhook URL each alert is POSTed to as JSON {text, alert} (Slack, "
        "Teams, Alertmanager-style receivers); None = ERROR log lines only; env/secret",
    )
    on_drift: Literal["none", "alert", "retrain"] = Field(
        "retrain", description="action on sustained feature or prediction drift"
    )
    on_decay: Literal["none", "alert", "retrain"] = Field(
        "retrain", description="action on decayed realised performance"
    )
    on_slo_breach: Literal["none", "alert", "rollback"] = Field(
        "rollback", description="action on an SLO breach (rollback only soon after a promotion)"
    )


class Settings(_Section):
    profile: str = Field("local", description="profile name the settings were built from")
    home: str = Field(description="MLOPS_HOME: all local state lives here")
    store: StoreSettings
    mlflow: MlflowSettings
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    serving: ServingSettings
    dataplane: DataPlaneSettings = DataPlaneSettings()
    shadow: ShadowSettings = ShadowSettings()
    canary: CanarySettings = CanarySettings()
    postgres: PostgresSettings = PostgresSettings()
    tuning: TuningSettings = TuningSettings()
    batch: BatchSettings = BatchSettings()
    monitoring: MonitoringSettings = MonitoringSettings()


def _secrets(s: Settings) -> dict[str, SecretStr | None]:
    """The secrets in the settings by dotted name: S3 keys, the MLflow token."""
    return {
        "store.key": s.store.key,
        "store.secret": s.store.secret,
        "mlflow.token": s.mlflow.token,
        "tuning.storage": s.tuning.storage,
        "monitoring.alert_webhook": s.monitoring.alert_webhook,
    }


def secret_values(s: Settings) -> list[str]:
    """The secrets' values (for masking in logs)."""
    return [v.get_secret_value() for v in _secrets(s).values() if v is not None]


# Values from examples and tutorials (infra/k8s/examples/secrets.example.yaml uses the first):
# harmless on a laptop, an open door anywhere else.
PLACEHOLDER_SECRETS = frozenset(
    {"replace-me", "change-me", "changeme", "minioadmin", "password", "secret", "admin"}
)
# Read by boto3/s3fs straight from the environment, beside the settings' own S3 keys.
_ENV_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def refuse_placeholder_secrets(s: Settings, environ: dict[str, str]) -> None:
    """Outside the local profile, a secret left at an example value stops the process with one
    sentence naming the setting (never the value)."""
    if s.profile == "local":
        return
    named = {
        **{f"{k} ({ENV_PREFIX}{k.upper().replace('.', '__')})": v for k, v in _secrets(s).items()},
        **{k: SecretStr(environ[k]) for k in _ENV_SECRETS if k in environ},
    }
    for name, value in named.items():
        if value is not None and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
            raise ConfigError(
                f"Profile {s.profile!r} refuses to start: secret {name} is still an example "
                "value; set it from a Kubernetes secret or an Airflow connection."
            )


def _describe(exc: ValidationError) -> str:
    """The errors by field, without the offending input: it may hold a key or token."""
    return "\n".join(
        f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
        for e in exc.errors(include_input=False, include_url=False)
    )


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
        loaded = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"Invalid configuration for profile {profile!r}:\n{_describe(exc)}"
        ) from None
    protect(*secret_values(loaded))  # no log record of this process may show them from now on
    refuse_placeholder_secrets(loaded, env)
    return loaded


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
        raise ConfigError(f"Invalid run overrides:\n{_describe(exc)}") from None
