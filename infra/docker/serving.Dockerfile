# syntax=docker/dockerfile:1
# TF Serving with this project's monitoring and batching configuration.
# Build from the repository root:
#   docker build -f infra/docker/serving.Dockerfile -t registry.example.com/mlops/tf-serving:2.21.0 .
#
# 2.21.0 matches tensorflow==2.21.0, which exports the SavedModels (requirements.txt). TF Serving
# tags lag TensorFlow releases (tensorflow/serving#4129); if 2.21.0 is not on Docker Hub yet, build
# with --build-arg TF_SERVING_VERSION=<nearest published 2.x, e.g. 2.20.0> and rerun the export's
# load-and-query check against it (serving contract tests: TF_SERVING_URL=...).
# Note: since 2.7 the image has no s3:// filesystem (tensorflow/serving#1963), so the Deployment
# mirrors the S3 base path into a local volume with a sync sidecar (infra/k8s/base/tf-serving.yaml).
ARG TF_SERVING_VERSION=2.21.0
FROM tensorflow/serving:${TF_SERVING_VERSION}

COPY infra/tf-serving/monitoring.config infra/tf-serving/batching.config /etc/tf-serving/

# Non-root, numeric so Kubernetes can verify runAsNonRoot; the server writes nothing.
USER 65532:65532
EXPOSE 8500 8501
# The binary itself instead of tf_serving_entrypoint.sh, which adds --model_name/--model_base_path.
ENTRYPOINT ["/usr/bin/tensorflow_model_server"]
# Each pool's Deployment (infra/k8s/base/tf-serving.yaml) passes these arguments with its own
# --model_config_file=/models/<label>/models.config, synced from S3 by its sidecar; TF Serving
# re-reads it every 30 s, so version changes need no restart.
CMD ["--port=8500", \
     "--rest_api_port=8501", \
     "--model_config_file=/models/stable/models.config", \
     "--model_config_file_poll_wait_seconds=30", \
     "--monitoring_config_file=/etc/tf-serving/monitoring.config", \
     "--enable_batching", \
     "--batching_parameters_file=/etc/tf-serving/batching.config", \
     "--allow_version_labels_for_unavailable_models"]
