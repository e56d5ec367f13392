# syntax=docker/dockerfile:1
# Trainer image: every training pod runs the torchrun line that the KubernetesPodOperator passes
# (`python -m torch.distributed.run --nnodes=... -m pipelines.train --manifest ... --run-id ...`,
# rendered by plugins/mlops_airflow/training.py).
# Build from the repository root:
#   docker build -f infra/docker/trainer.Dockerfile --build-arg GIT_SHA=$(git rev-parse HEAD) \
#     -t registry.example.com/mlops/trainer:0.1.0 .
#
# CPU build (DDP over gloo). For GPU nodes start from a CUDA runtime image instead, e.g.
#   FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 (plus a python3.11 install),
# install torch==2.13.0 from the matching CUDA index (https://download.pytorch.org/whl/cu128)
# and set train.gpus > 0: pods then request nvidia.com/gpu and DDP switches to nccl.
FROM python:3.11-slim

ARG GIT_SHA=unknown
ENV MLOPS__MLFLOW__CODE_VERSION=${GIT_SHA} \
    MLOPS_PROFILE=kubernetes \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch 2.13.0, CPU wheel, without deps (they are pinned in requirements-trainer.txt).
RUN pip install "setuptools>=77.0.3" && \
    pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# The project's pinned stack minus TensorFlow, Airflow and Great Expectations.
COPY infra/docker/requirements-trainer.txt /tmp/requirements-trainer.txt
RUN pip install -r /tmp/requirements-trainer.txt

# The package without deps (setup.cfg's install_requires also names tensorflow).
COPY setup.cfg pyproject.toml README.md /opt/mlops/src/
COPY pipelines /opt/mlops/src/pipelines
COPY plugins /opt/mlops/src/plugins
RUN pip install --no-deps /opt/mlops/src && rm -rf /opt/mlops/src

# Non-root; the pods set runAsNonRoot, so the user is numeric.
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/mlops mlops
USER 10001
WORKDIR /home/mlops
# No ENTRYPOINT/CMD: the KubernetesPodOperator gives the command (cmds=["python"], arguments=
# ["-m", "torch.distributed.run", ..., "-m", "pipelines.train", ...]).
