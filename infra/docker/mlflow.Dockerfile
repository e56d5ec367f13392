# syntax=docker/dockerfile:1
# MLflow tracking server and model registry (infra/k8s/base/mlflow.yaml): PostgreSQL backend
# store, S3 artifacts. The same mlflow version the clients use, plus the two drivers the server
# needs and the project's stack does not pin: psycopg2 (PostgreSQL) and boto3 (S3, pinned).
# Build from the repository root:
#   docker build -f infra/docker/mlflow.Dockerfile -t registry.example.com/mlops/mlflow:3.17.2 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY requirements.txt /tmp/requirements.txt
RUN pip install -c /tmp/requirements.txt mlflow==3.17.2 boto3==1.43.117 psycopg2-binary==2.9.13 && \
    rm /tmp/requirements.txt

RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/mlflow mlflow
USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
