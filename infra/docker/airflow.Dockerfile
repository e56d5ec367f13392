# syntax=docker/dockerfile:1
# Airflow image for the official Helm chart (infra/helm/airflow-values.yaml): scheduler, API
# server, DAG processor, triggerer and the KubernetesExecutor's task pods all run it.
# Build from the repository root:
#   docker build -f infra/docker/airflow.Dockerfile --build-arg GIT_SHA=$(git rev-parse HEAD) \
#     -t registry.example.com/mlops/airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11

# Code version recorded on MLflow runs and part of the training idempotency key
# (pipelines.registry.git_sha); build the trainer image with the same value.
ARG GIT_SHA=unknown
# true: add the CPU torch + TensorFlow runtime. The evaluate_model, export_and_infra_validate,
# stage_canary, monitor_canary and promote/rollback tasks run in Airflow's task pods and import
# torch (pipelines.train.model) and TensorFlow (pipelines.serving.export); only training runs in
# trainer pods. false: an orchestration-only image (those tasks then fail with ImportError).
ARG ML_RUNTIME=true
ENV MLOPS__MLFLOW__CODE_VERSION=${GIT_SHA} \
    MLOPS_PROFILE=kubernetes \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The official image installs into the airflow user's environment; pinning apache-airflow to the
# image's version keeps pip from up- or downgrading Airflow while it resolves our pins.
USER airflow
COPY --chown=airflow:root requirements.txt infra/docker/requirements-airflow.txt /tmp/mlops/
RUN pip install "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/mlops/requirements-airflow.txt

# torch from the CPU index without deps (a PyPI torch pulls multi-GB CUDA wheels); TensorFlow and
# torch's deps constrained to the exact pins of requirements.txt.
RUN if [ "${ML_RUNTIME}" = "true" ]; then \
      pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 && \
      pip install -c /tmp/mlops/requirements.txt "apache-airflow==${AIRFLOW_VERSION}" \
        tensorflow==2.21.0 tensorflow-serving-api==2.21.0 sympy networkx filelock; \
    fi

# The project package (pipelines + mlops_airflow) without deps: setup.cfg's install_requires
# names torch and tensorflow, the pinned stack above is what gets installed.
COPY --chown=airflow:root setup.cfg pyproject.toml README.md /opt/mlops/src/
COPY --chown=airflow:root pipelines /opt/mlops/src/pipelines
COPY --chown=airflow:root plugins /opt/mlops/src/plugins
RUN pip install --no-deps /opt/mlops/src && rm -rf /opt/mlops/src/build

# DAGs baked into the image (the chart's dags.persistence and dags.gitSync stay off).
COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
