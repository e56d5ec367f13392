"""TF Serving's gRPC API (``tensorflow-serving-api``) over the same :class:`ModelManager`.

``PredictionService``: Predict, Classify, Regress and GetModelMetadata. ``ModelService``:
GetModelStatus and HandleReloadConfigRequest. Errors use the gRPC codes TF Serving returns.
With batching on (``mlops serve --enable_batching``) Predict is batched like REST ``:predict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
    status_pb2,
)

from pipelines.serving import inference, model_config
from pipelines.serving.errors import ServingError

if TYPE_CHECKING:  # server.py imports this module when it starts gRPC
    from pipelines.serving.server import ModelManager

_STATES = {
    "UNKNOWN": 0,
    "START": 10,
    "LOADING": 20,
    "AVAILABLE": 30,
    "UNLOADING": 40,
    "END": 50,
}


@contextmanager
def _grpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn a :class:`ServingError` into the gRPC status TF Serving would return."""
    try:
        yield
    except ServingError as exc:
        context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN), exc.message)


def _spec(spec: Any) -> tuple[str, int | None, str | None]:
    version = spec.version.value if spec.HasField("version") else None
    return spec.name, version, spec.version_label or None


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        import tensorflow as tf

        name, version, label = _spec(request.model_spec)
        with _grpc_errors(context), self.manager.metered(name, "GRPC", "Predict"):
            columns = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            servable, outputs = self.manager.run_signature(
                name, columns, version, label, request.model_spec.signature_name
            )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = request.model_spec.signature_name or (
            "serving_default"
        )
        wanted = set(request.output_filter) or set(outputs)
        for key, value in outputs.items():
            if key in wanted:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = classification_pb2.ClassificationResponse()
        return self._infer(inference.CLASSIFY, request, response, context)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = regression_pb2.RegressionResponse()
        return self._infer(inference.REGRESS, request, response, context)

    def _infer(
        self, method: str, request: Any, response: Any, context: grpc.ServicerContext
    ) -> Any:
        """Classify or Regress; the response's model_spec names the version and signature used."""
        if not request.HasField("model_spec"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        name, version, label = _spec(request.model_spec)
        with _grpc_errors(context), self.manager.metered(name, "GRPC", method.title()):
            servable, signature, result = self.manager.infer(
                method, name, request.input, version, label, request.model_spec.signature_name
            )
        response.model_spec.name = name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        response.result.CopyFrom(result)
        return response

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        name, version, label = _spec(request.model_spec)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Metadata field signature_def is the only one supported",
            )
        with _grpc_errors(context):
            servable = self.manager.resolve(name, version, label)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = name
        response.model_spec.version.value = servable.version
        defs = get_model_metadata_pb2.SignatureDefMap()
        for key, proto in servable.signature_defs.items():
            defs.signature_def[key].CopyFrom(proto)
        response.metadata["signature_def"].Pack(defs)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        name, version, label = _spec(request.model_spec)
        with _grpc_errors(context):
            status = self.manager.status(name, version, label)
        response = get_model_status_pb2.GetModelStatusResponse()
        for st in status["model_version_status"]:
            entry = response.model_version_status.add()
            entry.version = int(st["version"])
            entry.state = _STATES[st["state"]]
            entry.status.error_code = 0 if st["status"]["error_code"] == "OK" else 2
            entry.status.error_message = st["status"]["error_message"]
        return response

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:
        entries = [
            model_config.ModelEntry(
                c.name,
                c.base_path,
                list(c.model_version_policy.specific.versions),
                dict(c.version_labels),
            )
            for c in request.config.model_config_list.config
        ]
        response = model_management_pb2.ReloadConfigResponse()
        try:
            self.manager.apply(entries)
            response.status.CopyFrom(status_pb2.StatusProto(error_code=0))
        except ServingError as exc:
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN).value[0]
            response.status.CopyFrom(
                status_pb2.StatusProto(error_code=code, error_message=exc.message)
            )
        return response


def make_grpc_server(
    manager: ModelManager,
    host: str = "127.0.0.1",
    port: int = 8500,
    credentials: grpc.ServerCredentials | None = None,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """A started gRPC server on ``host:port`` (0 = a free port); returns it and its port.
    With ``credentials`` (``grpc.ssl_server_credentials``) it serves TLS only. ``max_workers``
    bounds the RPCs in flight (a batched Predict holds its worker while its batch forms)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(manager), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), server)
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"Could not bind gRPC on {host}:{port}")
    server.start()
    return server, bound
