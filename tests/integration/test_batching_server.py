"""``mlops serve --enable_batching`` on a real SavedModel (tests/half_plus_two.py): the same
predictions as without batching, TF Serving's UNAVAILABLE answers from a full queue over REST
and gRPC, and a clean stop (no process, no batch thread left behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from pipelines.serving import model_config
from pipelines.serving.batching import QUEUE_FULL, BatchingParameters
from pipelines.serving.client import ServingClient
from pipelines.serving.server import ModelManager, make_server
from tests import half_plus_two

pytestmark = pytest.mark.integration
MODEL = half_plus_two.MODEL
VERSION = half_plus_two.VERSIONS[0]

# Production's shape, small: batches of up to 8 rows padded to 2/4/8, a 2 ms window.
NORMAL = """
max_batch_size { value: 8 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 2 }
allowed_batch_sizes: 2
allowed_batch_sizes: 4
allowed_batch_sizes: 8
"""
# A queue of one batch whose first row waits 5 s for company: a second request that does not
# fit it finds the queue full (TF Serving's SharedBatchScheduler answers the same way).
TINY = """
max_batch_size { value: 2 }
batch_timeout_micros { value: 5000000 }
max_enqueued_batches { value: 1 }
num_batch_threads { value: 1 }
"""


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    grpc_target: str
    log: Path


def _start(tmp: Path, name: str, config: Path, batching_text: str | None) -> Server:
    batching_file = tmp / f"{name}.batching.config"
    port_file = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--rest-port", "0", "--grpc-port", "0", "--model-config", str(config)]
    cmd += ["--poll-seconds", "60", "--port-file", str(port_file)]
    if batching_text is not None:
        batching_file.write_text(batching_text)
        cmd += ["--enable_batching", "--batching_parameters_file", str(batching_file)]
    log = tmp / f"{name}.log"
    env = {**os.environ, "MLOPS_HOME": str(tmp / f"{name}-home")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise RuntimeError(f"mlops serve ({name}) did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    info = json.loads(port_file.read_text())
    server = Server(
        proc, f"http://127.0.0.1:{info['rest_port']}", f"127.0.0.1:{info['grpc_port']}", log
    )
    ServingClient(server.url).wait_available(MODEL, VERSION, timeout=120)
    return server


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _stop_cleanly(server: Server) -> None:
    """SIGTERM, as `mlops serve --stop` and Kubernetes send it: exit 0, nothing left in its
    process group."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        _kill(server.proc)
        raise AssertionError(
            f"mlops serve ignored SIGTERM: {server.log.read_text()[-2000:]}"
        ) from None
    assert rc == 0, server.log.read_text()[-2000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(server.proc.pid, 0)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base path, models.config serving version 123) of TF Serving's half_plus_two."""
    out = tmp_path_factory.mktemp("half_plus_two")
    base = half_plus_two.write_model(out)
    config = out / "models.config"
    model_config.write(config, [model_config.ModelEntry(MODEL, str(base), [VERSION])])
    return base, config


@contextmanager
def _two_servers(tmp: Path, config: Path) -> Iterator[dict[str, Server]]:
    """Two batching servers, started together: ``normal`` and ``tiny`` (a one-batch queue);
    killed at the end if still running."""
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(_start, tmp, name, config, text)
            for name, text in (("normal", NORMAL), ("tiny", TINY))
        }
        started: dict[str, Server] = {}
        errors = []
        for name, f in futures.items():
            try:
                started[name] = f.result()
            except Exception as exc:  # noqa: BLE001 - stop the other before failing
                errors.append(exc)
    try:
        if errors:
            raise errors[0]
        yield started
    finally:
        for s in started.values():
            if s.proc.poll() is None:
                _kill(s.proc)


@pytest.fixture(scope="module")
def servers(
    model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """The module's two batching servers (see :func:`_two_servers`)."""
    with _two_servers(tmp_path_factory.mktemp("servers"), model[1]) as started:
        yield started


@pytest.fixture(scope="module")
def unbatched(model: tuple[Path, Path]) -> Iterator[str]:
    """The same server code with batching off, in this process: the reference answers."""
    manager = ModelManager(model[1], poll_seconds=60)
    manager.start()
    httpd = make_server(manager, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    ServingClient(url).wait_available(MODEL, VERSION, timeout=60)
    try:
        yield url
    finally:
        httpd.shutdown()
        httpd.server_close()
        manager.stop()


def _bodies() -> list[dict[str, Any]]:
    """Row and columnar requests of 1 to 5 rows, with distinct values to route back."""
    out: list[dict[str, Any]] = []
    for i in range(24):
        xs = [float(i * 10 + j) for j in range(1 + i % 5)]
        out.append({"instances": xs} if i % 2 else {"inputs": {"x": xs}})
    return out


def _post(url: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{url}/v1/models/{MODEL}:predict", json=body, timeout=30)


def test_batched_predictions_equal_unbatched_ones_under_concurrency(
    servers: dict[str, Server], unbatched: str
) -> None:
    bodies = _bodies()
    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(lambda b: _post(servers["normal"].url, b), bodies))
    plain = [_post(unbatched, b) for b in bodies]
    for body, got, want in zip(bodies, batched, plain, strict=True):
        assert got.status_code == want.status_code == 200, got.text
        assert got.json() == want.json()
        xs = body.get("instances") or body["inputs"]["x"]
        key = "predictions" if "instances" in body else "outputs"
        assert got.json()[key] == [x / 2 + 2 for x in xs]
    metrics = requests.get(f"{servers['normal'].url}/monitoring/prometheus/metrics", timeout=10)
    labels = f'model_name="{MODEL}",version="{VERSION}",signature="serving_default"'
    counts = {
        line.split("{")[0]: int(line.rsplit(" ", 1)[1])
        for line in metrics.text.splitlines()
        if labels in line
    }
    assert counts["mlops_serving_batching_tasks_total"] >= len(bodies)
    assert (
        1
        <= counts["mlops_serving_batching_batches_total"]
        <= counts["mlops_serving_batching_tasks_total"]
    )


def test_grpc_predict_is_batched_too(servers: dict[str, Server]) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    def one(i: int) -> list[float]:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL
        req.inputs["x"].CopyFrom(tf.make_tensor_proto([float(i), float(i + 1)], tf.float32))
        resp = stub.Predict(req, timeout=30)
        assert resp.model_spec.version.value == VERSION
        return tf.make_ndarray(resp.outputs["y"]).tolist()  # type: ignore[no-any-return]

    with grpc.insecure_channel(servers["normal"].grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(16)))
    assert answers == [[i / 2 + 2, (i + 1) / 2 + 2] for i in range(16)]


def test_a_request_over_max_batch_size_is_a_400(servers: dict[str, Server]) -> None:
    r = _post(servers["normal"].url, {"instances": [1.0] * 9})
    assert r.status_code == 400
    assert "Task size 9 is larger than maximum batch size 8" in r.json()["error"]


def test_a_full_queue_answers_503_and_grpc_unavailable(servers: dict[str, Server]) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    url = servers["tiny"].url
    req = predict_pb2.PredictRequest()
    req.model_spec.name = MODEL
    req.inputs["x"].CopyFrom(tf.make_tensor_proto([4.0, 5.0], tf.float32))
    with (
        grpc.insecure_channel(servers["tiny"].grpc_target) as channel,
        ThreadPoolExecutor(1) as pool,
    ):
        grpc.channel_ready_future(channel).result(timeout=30)  # connected before the window
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        waiting = pool.submit(_post, url, {"instances": [1.0]})  # holds the one batch for 5 s
        time.sleep(0.5)
        started = time.monotonic()
        refused = _post(url, {"instances": [2.0, 3.0]})  # does not fit it: queue full
        assert time.monotonic() - started < 2  # refused at once, not after the window
        assert refused.status_code == 503
        assert refused.json() == {"error": QUEUE_FULL}
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == QUEUE_FULL
        answer = waiting.result(30)  # the waiting request still gets its answer
        assert answer.status_code == 200 and answer.json() == {"predictions": [2.5]}


def test_real_model_batches_coalesce_and_an_unloaded_version_stops_its_threads(
    model: tuple[Path, Path], tmp_path: Path
) -> None:
    base, _ = model
    config = tmp_path / "models.config"
    model_config.write(config, [model_config.ModelEntry(MODEL, str(base), [VERSION])])
    params = BatchingParameters(
        max_batch_size=8,
        batch_timeout_micros=200_000,
        num_batch_threads=2,
        thread_pool_name="unload",
        allowed_batch_sizes=(4, 8),
    )
    manager = ModelManager(config, poll_seconds=60, batching=params)
    manager.start()
    try:
        deadline = time.monotonic() + 60
        while manager.models[MODEL].servables[VERSION].state != "AVAILABLE":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert manager.predict(MODEL, {"instances": [4.0]}) == {"predictions": [4.0]}
        batcher = manager.models[MODEL].servables[VERSION].batchers["serving_default"]
        seen: list[int] = []
        run = batcher.run
        batcher.run = lambda inputs: (seen.append(len(inputs["x"])), run(inputs))[1]
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda i: manager.predict(MODEL, {"instances": [float(i)]}), range(8))
            )
        assert answers == [{"predictions": [i / 2 + 2]} for i in range(8)]
        assert len(seen) < 8 and all(n in (4, 8) for n in seen)  # coalesced, then padded

        def batch_threads() -> list[str]:
            return [t.name for t in threading.enumerate() if t.name.startswith("unload_")]

        assert len(batch_threads()) == 2
        model_config.write(config, [model_config.ModelEntry(MODEL, str(base), [VERSION + 1])])
        manager.poll_once()  # version 123 unloads
        assert batch_threads() == []
    finally:
        manager.stop()


def test_batching_servers_stop_cleanly(model: tuple[Path, Path], tmp_path: Path) -> None:
    """Both processes exit 0 on SIGTERM, their process groups empty (a pair of their own: the
    module's pair serves the other tests, in any order)."""
    with _two_servers(tmp_path, model[1]) as servers:
        for server in servers.values():
            _stop_cleanly(server)
            with pytest.raises(requests.ConnectionError):
                requests.get(f"{server.url}/v1/models/{MODEL}", timeout=5)


def test_a_bad_batching_file_stops_mlops_serve_in_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.config"
    bad.write_text("max_batch_size { value: 4 }\nallowed_batch_sizes: 2\n")
    env = {**os.environ, "MLOPS_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--rest-port", "0", "--grpc-port"]
    cmd += ["-1", "--model-config", str(tmp_path / "none.config"), "--enable_batching"]
    cmd += ["--batching_parameters_file", str(bad)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"mlops serve: {bad}: Last entry in allowed_batch_sizes must match max_batch_size; "
        "last entry was 2; expected 4"
    )
