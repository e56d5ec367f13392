"""A TF-Serving-compatible model server for dev, tests and the demo (``mlops serve``).

Speaks TF Serving's REST API (status, metadata, ``:predict``, ``:classify`` and ``:regress`` by
version or label, its error bodies and status codes), reads and polls a ``model_config_list`` file
with version labels (labels may only point at AVAILABLE versions), and exposes Prometheus metrics
at ``/monitoring/prometheus/metrics``. Production runs the real tensorflow/serving image instead.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.serving import inference, model_config
from pipelines.serving.batching import Batcher, BatchingParameters, RunFn
from pipelines.serving.errors import ServingError

log = logging.getLogger(__name__)
# One JSON line per REST model call (INFO), keyed by the request id Envoy forwards: a request
# followed from the data plane's access log to the replica that answered it.
request_log = logging.getLogger("pipelines.serving.requests")
MAX_BODY = 8 << 20


@dataclass
class Servable:
    version: int
    state: str = "START"
    error_code: str = "OK"
    error_message: str = ""
    signature: Any = None
    signature_defs: dict[str, Any] = field(default_factory=dict)
    warmup_requests: int = 0  # warmup records replayed before the version became AVAILABLE
    batchers: dict[str, Batcher] = field(default_factory=dict)  # by signature, when batching

    def status(self) -> dict[str, Any]:
        return {
            "version": str(self.version),
            "state": self.state,
            "status": {"error_code": self.error_code, "error_message": self.error_message},
        }


@dataclass
class ModelState:
    name: str
    base_path: str
    servables: dict[int, Servable] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)


WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"  # where TF Serving looks for them
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def _warm_up(signatures: Any, signature_defs: dict[str, Any], path: Path) -> int:
    """Replay the SavedModel's warmup records, as TF Serving does before a version becomes
    AVAILABLE: its first real requests then do not pay for the graph's first run. A record
    that fails fails the load. Predict, Classify and Regress records are replayed; others
    (MultiInference) are skipped with a warning. Returns the requests replayed."""
    records = path / WARMUP_FILE
    if not records.exists():
        return 0
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    done = 0
    for raw in tf.data.TFRecordDataset(str(records)).take(MAX_WARMUP_RECORDS):
        entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        kind = entry.WhichOneof("log_type")
        if kind == "predict_log":
            request = entry.predict_log.request
            fn = signatures[request.model_spec.signature_name or "serving_default"]
            fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        elif kind in ("classify_log", "regress_log"):
            request = getattr(entry, kind).request
            method = inference.CLASSIFY if kind == "classify_log" else inference.REGRESS
            inference.run(
                method, signature_defs, signatures, request.model_spec.signature_name, request.input
            )
        else:
            log.warning("skipping a %s warmup record", kind)
            continue
        done += 1
    return done


def _local_path(base_path: str) -> Path:
    return Path(base_path.removeprefix("file://"))


def _load_signature_defs(path: Path) -> dict[str, Any]:
    """The ``serve`` MetaGraph's SignatureDef protos, read from ``saved_model.pb``."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    for mg in sm.meta_graphs:
        if "serve" in mg.meta_info_def.tags:
            return dict(mg.signature_def)
    raise ServingError("NOT_FOUND", f"SavedModel at {path} has no 'serve' MetaGraph")


class ModelManager:
    """Loads the versions a config lists, applies labels, answers status and predict."""

    def __init__(
        self,
        config_file: str | Path | None = None,
        poll_seconds: float = 1.0,
        allow_labels_for_unavailable: bool = False,
        batching: BatchingParameters | None = None,
    ):
        self.config_file = Path(config_file) if config_file else None
        self.poll_seconds = poll_seconds
        # TF Serving's --allow_version_labels_for_unavailable_models: a new label (or one kept
        # on its version) may point at a version that is still loading; moving a label onto
        # such a version is refused either way.
        self.allow_labels_for_unavailable = allow_labels_for_unavailable
        self.models: dict[str, ModelState] = {}
        self.lock = threading.RLock()
        self._last_text: str | None = None
        self._stop = threading.Event()
        self.counters: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list[float]] = {}
        # TF Serving's --enable_batching: predict calls go through one Batcher per servable
        # signature; None runs each request on its own, as before.
        self.batching = batching

    # -- config ---------------------------------------------------------------------------
    def start(self) -> None:
        # Import TensorFlow (and the serving protos) here, in the caller's thread: a first
        # import racing between loader threads and the gRPC server deadlocks on module locks.
        import tensorflow  # noqa: F401
        import tensorflow_serving.apis.predict_pb2  # noqa: F401

        self._initial_load()
        if self.config_file and self.poll_seconds > 0:
            threading.Thread(target=self._poll_loop, daemon=True, name="config-poll").start()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            batchers = [
                b
                for m in self.models.values()
                for s in m.servables.values()
                for b in self._retire_batchers(s)
            ]
        for b in batchers:  # outside the lock: a batch still running may need it
            b.stop()

    @staticmethod
    def _retire_batchers(servable: Servable) -> list[Batcher]:
        """Detach a servable's batchers (caller holds the lock), to be stopped after it."""
        batchers = list(servable.batchers.values())
        servable.batchers.clear()
        return batchers

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:
                log.exception("config poll failed")

    def _initial_load(self) -> None:
        """TF Serving's first config is applied like any reload: labels are checked before any
        version is added, so a first config with labels is refused, and the server does not
        start, unless it runs with --allow_version_labels_for_unavailable_models (the local
        data plane and infra/k8s pass it, so a restarted replica comes back labelled)."""
        if self.config_file is None or not self.config_file.exists():
            return
        text = self.config_file.read_text()
        try:
            entries = model_config.parse(text)
        except Exception:  # noqa: BLE001 - the poll reports a bad file, as for any reload
            return
        try:
            self.apply(entries)
        except ServingError as exc:
            raise ServingError(
                exc.code,
                f"{exc.message} (first config {self.config_file}: TF Serving assigns labels "
                "to versions that are still loading only when started with "
                "--allow_version_labels_for_unavailable_models)",
            ) from None
        self._last_text = text

    def poll_once(self) -> None:
        """Re-apply the config file. Like TF Serving, every poll re-applies; failures log."""
        if self.config_file is None or not self.config_file.exists():
            return
        text = self.config_file.read_text()
        try:
            self.apply(model_config.parse(text))
        except ServingError as exc:
            if text != self._last_text:
                log.error("config %s not applied: %s", self.config_file, exc.message)
        self._last_text = text

    def apply(self, entries: list[model_config.ModelEntry]) -> None:
        import tensorflow  # noqa: F401  # see start(): never first-import TF in a loader thread

        retired: list[Batcher] = []
        try:
            self._apply(entries, retired)
        finally:
            for b in retired:  # unloaded versions leave no batch thread behind
                b.stop()

    def _apply(self, entries: list[model_config.ModelEntry], retired: list[Batcher]) -> None:
        with self.lock:
            # Labels are checked before any version is added (server_core.cc order), so a
            # config that adds a version and labels it in one step is rejected whole.
            for e in entries:
                current = self.models.get(e.name)
                for label, v in e.labels.items():
                    s = current.servables.get(v) if current else None
                    if s is not None and s.state == "AVAILABLE":
                        continue
                    kept = current is None or current.labels.get(label, v) == v
                    if not (self.allow_labels_for_unavailable and kept):
                        raise ServingError(
                            "FAILED_PRECONDITION",
                            f"Request to assign label to version {v} of model {e.name}, which "
                            "is not currently available for inference",
                        )
            wanted = {e.name for e in entries}
            for name in list(self.models):
                if name not in wanted:
                    for s in self.models[name].servables.values():
                        s.state = "END"
                        retired.extend(self._retire_batchers(s))
                    del self.models[name]
            for e in entries:
                state = self.models.setdefault(e.name, ModelState(e.name, e.base_path))
                state.base_path = e.base_path
                versions = e.versions or self._latest_on_disk(e.base_path)
                for v in list(state.servables):
                    if v not in versions:
                        gone = state.servables.pop(v)
                        gone.state = "END"
                        retired.extend(self._retire_batchers(gone))
                for v in versions:
                    if v not in state.servables:
                        state.servables[v] = Servable(v, state="LOADING")
                        threading.Thread(target=self._load, args=(state, v), daemon=True).start()
                state.labels = dict(e.labels)

    @staticmethod
    def _latest_on_disk(base_path: str) -> list[int]:
        base = _local_path(base_path)
        versions = (
            sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.exists() else []
        )
        return versions[-1:]

    @staticmethod
    def _version_dir(base_path: str, version: int) -> Path:
        """TF Serving reads any directory whose name parses as the version: ``00000123`` is
        version 123, as in its own test models."""
        base = _local_path(base_path)
        plain = base / str(version)
        if plain.exists() or not base.is_dir():
            return plain
        named = [p for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
        return next((p for p in sorted(named) if int(p.name) == version), plain)

    def _load(self, state: ModelState, version: int) -> None:
        servable = state.servables[version]
        path = self._version_dir(state.base_path, version)
        try:
            import tensorflow as tf

            if not (path / "saved_model.pb").exists():
                raise FileNotFoundError(f"no SavedModel at {path}")
            loaded = tf.saved_model.load(str(path), tags=["serve"])
            servable.signature_defs = _load_signature_defs(path)
            servable.signature = loaded.signatures
            servable._loaded = loaded  # type: ignore[attr-defined]  # keep the object alive
            servable.warmup_requests = _warm_up(loaded.signatures, servable.signature_defs, path)
            servable.state = "AVAILABLE"
            log.info(
                "model %s version %d AVAILABLE (%d warmup requests)",
                state.name,
                version,
                servable.warmup_requests,
            )
        except Exception as exc:  # noqa: BLE001 - a failed load is a version state, not a crash
            servable.state, servable.error_code = "END", "UNKNOWN"
            servable.error_message = f"Failed to load {path}: {exc}"
            log.error("model %s version %d failed to load: %s", state.name, version, exc)

    # -- lookups --------------------------------------------------------------------------
    def _model(self, name: str) -> ModelState:
        with self.lock:
            if name not in self.models:
                raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
            return self.models[name]

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        m = self._model(name)
        with self.lock:
            if label is not None:
                if label not in m.labels:
                    raise ServingError(
                        "INVALID_ARGUMENT", f"Unrecognized servable version label: {label}"
                    )
                version = m.labels[label]
            if version is None:
                live = [s for s in m.servables.values() if s.state == "AVAILABLE"]
                if not live:
                    raise ServingError(
                        "NOT_FOUND", f"Servable not found for request: Latest({name})"
                    )
                return max(live, key=lambda s: s.version)
            s = m.servables.get(version)
            if s is None or s.state != "AVAILABLE":
                raise ServingError(
                    "NOT_FOUND", f"Servable not found for request: Specific({name}, {version})"
                )
            return s

    def status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> dict[str, Any]:
        m = self._model(name)
        with self.lock:
            if label is not None:
                if label not in m.labels:
                    raise ServingError(
                        "INVALID_ARGUMENT", f"Unrecognized servable version label: {label}"
                    )
                version = m.labels[label]
            if version is not None:
                if version not in m.servables:
                    raise ServingError(
                        "NOT_FOUND", f"Could not find version {version} of model {name}"
                    )
                return {"model_version_status": [m.servables[version].status()]}
            return {
                "model_version_status": [
                    s.status() for _, s in sorted(m.servables.items(), reverse=True)
                ]
            }

    def metadata(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> dict[str, Any]:
        from google.protobuf import json_format

        s = self.resolve(name, version, label)
        defs = {
            k: json_format.MessageToDict(v, preserving_proto_field_name=True)
            for k, v in s.signature_defs.items()
        }
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(s.version)},
            "metadata": {"signature_def": {"signature_def": defs}},
        }

    # -- predict, classify, regress --------------------------------------------------------
    @contextmanager
    def metered(self, name: str, entrypoint: str, api: str = "predict") -> Iterator[None]:
        """Count the request by status and record its latency (TF Serving's two series; ``api``
        is the REST method, ``predict``/``classify``/``regress``, or the gRPC one, ``Predict``)."""
        started = time.perf_counter()
        code = "OK"
        try:
            yield
        except ServingError as exc:
            code = exc.code
            raise
        finally:
            with self.lock:
                key = (name, code)
                self.counters[key] = self.counters.get(key, 0) + 1
                series = self.latency.setdefault(f"{name}|{api}|{entrypoint}", [])
                series.append((time.perf_counter() - started) * 1e6)
                if len(series) > 100_000:
                    del series[:50_000]

    def run_signature(
        self,
        name: str,
        columns: dict[str, Any],
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "",
    ) -> tuple[Servable, dict[str, Any]]:
        """Run a signature on named inputs (lists or arrays); returns numpy outputs."""
        import numpy as np
        import tensorflow as tf

        s = self.resolve(name, version, label)
        sig_name = signature_name or "serving_default"
        if sig_name not in s.signature:
            raise ServingError(
                "FAILED_PRECONDITION",
                f'Serving signature name: "{sig_name}" not found in signature def. The model '
                f"exports: {', '.join(inference.callable_signatures(s.signature_defs))}",
            )
        fn = s.signature[sig_name]
        specs = fn.structured_input_signature[1]
        missing = [n for n in specs if n not in columns]
        if missing:
            raise ServingError("INVALID_ARGUMENT", f"Missing named input(s): {missing}")
        try:
            tensors = {k: tf.constant(columns[k], dtype=specs[k].dtype) for k in specs}
        except (TypeError, ValueError) as exc:
            raise ServingError("INVALID_ARGUMENT", f"Could not parse input values: {exc}") from exc
        if self.batching is not None:
            batcher = self._batcher(name, s, sig_name)
            return s, batcher.submit({k: np.asarray(v.numpy()) for k, v in tensors.items()})
        try:
            out = fn(**tensors)
        except tf.errors.InvalidArgumentError as exc:
            raise ServingError("INVALID_ARGUMENT", exc.message) from exc
        return s, {k: np.asarray(v.numpy()) for k, v in out.items()}

    def _batcher(self, name: str, s: Servable, sig_name: str) -> Batcher:
        """The servable signature's batcher, started on first use. Not for a version that
        is unloading: its batchers were stopped, a new one would never be."""
        assert self.batching is not None
        with self.lock:
            batcher = s.batchers.get(sig_name)
            if batcher is None:
                if self._stop.is_set():  # stop() has stopped the batchers: start no more
                    raise ServingError("UNAVAILABLE", "The server is shutting down")
                if s.state != "AVAILABLE":
                    raise ServingError(
                        "NOT_FOUND",
                        f"Servable not found for request: Specific({name}, {s.version})",
                    )
                batcher = Batcher(
                    _batch_runner(s.signature[sig_name]),
                    self.batching,
                    f"{name}_{s.version}_{sig_name}",
                )
                s.batchers[sig_name] = batcher
            return batcher

    def predict(
        self, name: str, body: dict[str, Any], version: int | None = None, label: str | None = None
    ) -> dict[str, Any]:
        """The REST ``:predict`` call: row (``instances``) or columnar (``inputs``) format."""
        with self.metered(name, "REST"):
            if not isinstance(body, dict):
                raise ServingError("INVALID_ARGUMENT", "JSON Value: request body is not an object")
            if ("instances" in body) == ("inputs" in body):
                raise ServingError(
                    "INVALID_ARGUMENT", "Missing 'instances' or 'inputs' key, or both are present"
                )
            s = self.resolve(name, version, label)
            sig = s.signature.get(body.get("signature_name") or "serving_default")
            specs = sig.structured_input_signature[1] if sig is not None else {}
            row_format = "instances" in body
            payload = body["instances"] if row_format else body["inputs"]
            columns = _columns(payload, specs, row_format) if specs else {}
            _, out = self.run_signature(
                name, columns, s.version, None, body.get("signature_name") or ""
            )
            outputs = {k: _to_json(v) for k, v in out.items()}
            if row_format:
                if len(outputs) == 1:
                    return {"predictions": next(iter(outputs.values()))}
                n = len(next(iter(outputs.values())))
                return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(n)]}
            return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}

    def infer(
        self,
        method: str,
        name: str,
        request_input: Any,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "",
    ) -> tuple[Servable, str, Any]:
        """Classify or Regress (``inference.CLASSIFY``/``REGRESS``) a gRPC ``Input`` of
        tf.Examples; returns the servable, the signature used and the result proto."""
        s = self.resolve(name, version, label)
        used, result = inference.run(
            method, s.signature_defs, s.signature, signature_name, request_input
        )
        return s, used, result

    def classify_or_regress(
        self,
        method: str,
        name: str,
        body: Any,
        version: int | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """The REST ``:classify``/``:regress`` call; TF Serving answers ``{"results": [...]}``."""
        with self.metered(name, "REST", method):
            signature_name, request_input = inference.input_from_json(body)
            _, _, result = self.infer(method, name, request_input, version, label, signature_name)
            return {"results": inference.result_json(result)}

    def prometheus(self) -> str:
        """TF Serving's request count and latency series, in Prometheus text format."""
        lines = ["# TYPE :tensorflow:serving:request_count counter"]
        with self.lock:
            for (model, status), n in sorted(self.counters.items()):
                labels = f'model_name="{model}",status="{status}"'
                lines.append(f":tensorflow:serving:request_count{{{labels}}} {n}")
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            bounds = [*(f"{10 * 1.8**i:.0f}" for i in range(33)), "+Inf"]
            for key, values in sorted(self.latency.items()):
                model, api, entrypoint = key.split("|", 2)
                labels = f'model_name="{model}",API="{api}",entrypoint="{entrypoint}"'
                ordered = sorted(values)
                for b in bounds:
                    c = len(ordered) if b == "+Inf" else bisect.bisect_right(ordered, float(b))
                    lines.append(
                        f':tensorflow:serving:request_latency_bucket{{{labels},le="{b}"}} {c}'
                    )
                lines.append(f":tensorflow:serving:request_latency_count{{{labels}}} {len(values)}")
                lines.append(
                    f":tensorflow:serving:request_latency_sum{{{labels}}} {sum(values):.0f}"
                )
            if self.batching is not None:
                lines += self._batching_lines()
        return "\n".join(lines) + "\n"

    def _batching_lines(self) -> list[str]:
        """Per servable signature: batches run, the requests and rows in them, padding rows
        (the project's own series: how much batching actually coalesced)."""
        series: dict[str, list[str]] = {k: [] for k in ("batches", "tasks", "rows", "padding_rows")}
        for m in self.models.values():
            for s in m.servables.values():
                for sig, b in sorted(s.batchers.items()):
                    labels = f'model_name="{m.name}",version="{s.version}",signature="{sig}"'
                    for key, n in b.stats.items():
                        series[key].append(f"mlops_serving_batching_{key}_total{{{labels}}} {n}")
        out = []
        for key, rows in series.items():
            out += [f"# TYPE mlops_serving_batching_{key}_total counter", *rows]
        return out


def _batch_runner(fn: Any) -> RunFn:
    """Run a signature on one merged batch of numpy inputs, in a batch thread."""
    specs = fn.structured_input_signature[1]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        try:
            out = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})
        except tf.errors.InvalidArgumentError as exc:
            raise ServingError("INVALID_ARGUMENT", exc.message) from exc
        return {k: np.asarray(v.numpy()) for k, v in out.items()}

    return run


def _columns(payload: Any, specs: dict[str, Any], row_format: bool) -> dict[str, list[Any]]:
    names = list(specs)
    if row_format:
        if not isinstance(payload, list) or not payload:
            raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty JSON list")
        cols: dict[str, list[Any]] = {n: [] for n in names}
        for i, inst in enumerate(payload):
            if len(names) == 1 and not isinstance(inst, dict):
                cols[names[0]].append(inst)
                continue
            if not isinstance(inst, dict):
                raise ServingError(
                    "INVALID_ARGUMENT", f"instances[{i}] must be a JSON object keyed by input name"
                )
            missing = [n for n in names if n not in inst]
            if missing:
                raise ServingError(
                    "INVALID_ARGUMENT", f"instances[{i}] is missing named input(s): {missing}"
                )
            for n in names:
                cols[n].append(inst[n])
        return cols
    if len(names) == 1 and not isinstance(payload, dict):
        return {names[0]: payload}
    if not isinstance(payload, dict):
        raise ServingError("INVALID_ARGUMENT", "'inputs' must be a JSON object keyed by name")
    missing = [n for n in names if n not in payload]
    if missing:
        raise ServingError("INVALID_ARGUMENT", f"'inputs' is missing named input(s): {missing}")
    return {n: payload[n] for n in names}


def _to_json(arr: Any) -> Any:
    if arr.dtype.kind in ("S", "O"):
        return [v.decode() if isinstance(v, bytes) else v for v in arr.tolist()]
    return arr.tolist()


_ROUTE = re.compile(
    r"^/v1/models/(?P<model>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<tail>/metadata|:predict|:classify|:regress)?$"
)


class RestHandler(BaseHTTPRequestHandler):
    manager: ModelManager
    started: float | None = None  # when the POST being answered arrived (epoch s)
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet access log
        log.debug(fmt, *args)

    def _send(
        self,
        status: int,
        body: dict[str, Any] | str,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self._log_call(status, headers or {})
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: ServingError) -> None:
        self._send(exc.http_status, {"error": exc.message})

    def _match(self) -> re.Match[str] | None:
        return _ROUTE.match(self.path.split("?", 1)[0])

    def do_GET(self) -> None:
        if self.path.startswith("/monitoring/prometheus/metrics"):
            self._send(200, self.manager.prometheus(), "text/plain; version=0.0.4")
            return
        m = self._match()
        if m is None or (m["tail"] and m["tail"] != "/metadata"):
            self._send(404, {"error": f"Malformed request: GET {self.path}"})
            return
        version = int(m["version"]) if m["version"] else None
        try:
            if m["tail"] == "/metadata":
                self._send(200, self.manager.metadata(m["model"], version, m["label"]))
            else:
                self._send(200, self.manager.status(m["model"], version, m["label"]))
        except ServingError as exc:
            self._error(exc)

    def do_POST(self) -> None:
        self.started = time.time()
        try:
            self._post()
        finally:
            self.started = None

    def _log_call(self, status: int, headers: dict[str, str]) -> None:
        """The call's JSON line, written before its answer (a client that has the answer can
        read the line)."""
        if self.started is None or not request_log.isEnabledFor(logging.INFO):
            return
        request_log.info(
            json.dumps(
                {
                    "time": round(self.started, 3),
                    "request_id": self.headers.get("x-request-id") or "",
                    "path": self.path.split("?", 1)[0],
                    "status": status,
                    "version": headers.get("x-model-version"),
                    "duration_ms": round((time.time() - self.started) * 1000, 3),
                }
            )
        )

    def _post(self) -> None:
        m = self._match()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(413, {"error": f"Request body larger than {MAX_BODY} bytes"})
            return
        raw = self.rfile.read(length) if length else b""
        if m is None or m["tail"] not in (":predict", ":classify", ":regress"):
            self._send(404, {"error": f"Malformed request: POST {self.path}"})
            return
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            self._error(ServingError("INVALID_ARGUMENT", f"JSON Parse error: {exc}"))
            return
        except RecursionError:  # 100,000 levels of "[": an answer, not a dropped connection
            self._error(ServingError("INVALID_ARGUMENT", "JSON Parse error: nested too deeply"))
            return
        version = int(m["version"]) if m["version"] else None
        method = m["tail"][1:]
        try:
            # The label is resolved once, so the answer and its x-model-version header agree
            # even when the label moves meanwhile (the data plane logs the header). When it
            # does not resolve, the call below fails the same way, and is counted.
            label = m["label"]
            try:
                version, label = self.manager.resolve(m["model"], version, label).version, None
            except ServingError:
                pass
            if method == "predict":
                answer = self.manager.predict(m["model"], body, version, label)
            else:
                answer = self.manager.classify_or_regress(method, m["model"], body, version, label)
            self._send(200, answer, headers={"x-model-version": str(version)})
        except ServingError as exc:
            self._error(exc)
        except RecursionError:
            self._error(ServingError("INVALID_ARGUMENT", "Request nested too deeply"))


class RestServer(ThreadingHTTPServer):
    """The REST listener. Its listen backlog is the kernel's cap, not socketserver's 5: Envoy
    opens a connection per concurrent request when its pooled ones are busy (mirrored shadow
    traffic arrives in bursts), and a replica slow to accept() on a busy machine then refused
    them; Envoy reads a refused connection as a failed upstream (503 "UF"), so the candidate's
    shadow answers counted as its errors."""

    request_queue_size = socket.SOMAXCONN
    daemon_threads = True


def make_server(
    manager: ModelManager, host: str = "127.0.0.1", port: int = 8501
) -> ThreadingHTTPServer:
    handler = type("BoundRestHandler", (RestHandler,), {"manager": manager})
    return RestServer((host, port), handler)


def serve(
    config_file: str | Path,
    host: str = "127.0.0.1",
    rest_port: int = 8501,
    grpc_port: int | None = 8500,
    poll_seconds: float = 1.0,
    port_file: str | Path | None = None,
    allow_labels_for_unavailable: bool = False,
    batching: BatchingParameters | None = None,
) -> None:
    """Run REST (and gRPC unless ``grpc_port`` is None) until SIGTERM/SIGINT.

    Port 0 picks a free port; the bound ports are written to ``port_file`` when given.
    ``batching`` (TF Serving's --enable_batching) batches predict calls."""
    import signal

    manager = ModelManager(config_file, poll_seconds, allow_labels_for_unavailable, batching)
    manager.start()
    server = make_server(manager, host, rest_port)
    grpc_server = None
    bound_grpc = None
    if grpc_port is not None:
        from pipelines.serving.grpc_api import make_grpc_server

        # Batching wants more requests in flight than batch threads: TF Serving's advice is
        # about twice max_batch_size client threads (session_bundle_config.proto).
        workers = 8 if batching is None else max(8, min(2 * batching.max_batch_size, 128))
        grpc_server, bound_grpc = make_grpc_server(manager, host, grpc_port, max_workers=workers)
    port = server.server_address[1]
    if port_file:
        from pipelines.serving.daemon import write_port_file

        write_port_file(port_file, rest_port=port, grpc_port=bound_grpc, host=host)
    # SIGTERM (what `mlops serve --stop` and Kubernetes send) shuts down cleanly.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("serving REST on %s:%d, gRPC on %s (config %s)", host, port, bound_grpc, config_file)
    if batching is not None:
        log.info("request batching on: %s", batching)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        manager.stop()
        server.server_close()
        if grpc_server is not None:
            grpc_server.stop(grace=1)
