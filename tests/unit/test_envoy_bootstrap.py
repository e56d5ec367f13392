"""The data plane's pure parts: the Envoy bootstrap, the split, access-log parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import DataPlaneSettings, load_settings
from pipelines.serving.dataplane.envoy import (
    POOLS,
    Plane,
    Pool,
    kubernetes_plane,
    render_bootstrap,
)
from pipelines.serving.dataplane.evidence import by_label, parse_line
from pipelines.serving.dataplane.split import RuntimeDirectory, Split, SplitError

CFG = DataPlaneSettings()


def _plane(**kw: object) -> Plane:
    base = dict(
        model="fraud_detector",
        cfg=CFG,
        pools=(
            Pool("stable", (("127.0.0.1", 8501), ("127.0.0.1", 8502))),
            Pool("baseline", (("127.0.0.1", 8503), ("127.0.0.1", 8504))),
            Pool("canary", (("127.0.0.1", 8505), ("127.0.0.1", 8506))),
        ),
        listen=("127.0.0.1", 8601),
        admin=("127.0.0.1", 9901),
        shadow=("127.0.0.1", 8602),
        runtime_root="/tmp/split/..data",
        access_log="/tmp/access.log",
    )
    base.update(kw)
    return Plane(**base)  # type: ignore[arg-type]


def _routes(boot: dict, listener: str = "primary") -> list[dict]:
    (lst,) = [x for x in boot["static_resources"]["listeners"] if x["name"] == listener]
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


def test_the_split_route_is_weighted_sticky_and_retried_on_another_replica() -> None:
    boot = render_bootstrap(_plane(static_weights={"stable": 50, "baseline": 25, "canary": 25}))
    (split,) = [r for r in _routes(boot) if r["name"] == "model-call"]
    action = split["route"]
    wc = action["weighted_clusters"]
    assert wc["runtime_key_prefix"] == "mlops.weights" and wc["use_hash_policy"] is True
    assert [(c["name"], c["weight"]) for c in wc["clusters"]] == [
        ("stable", 50),
        ("baseline", 25),
        ("canary", 25),
    ]
    assert action["hash_policy"] == [{"header": {"header_name": "x-request-key"}}]
    retry = action["retry_policy"]
    assert set(retry["retry_on"].split(",")) == {"connect-failure", "reset", "refused-stream"}
    assert retry["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    assert action["request_mirror_policies"][0]["cluster"] == "shadow"


def test_pools_balance_by_least_request_with_health_checks_and_ejection() -> None:
    boot = render_bootstrap(_plane())
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    for label in POOLS:
        c = clusters[label]
        assert c["lb_policy"] == "LEAST_REQUEST"
        assert len(c["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
        hc = c["health_checks"][0]
        assert hc["http_health_check"]["path"] == "/v1/models/fraud_detector"
        assert hc["no_traffic_interval"] == hc["interval"]  # a weight-0 canary is still watched
        assert c["outlier_detection"]["consecutive_5xx"] == CFG.eject_after_5xx
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_envoy_itself_accepts_the_bootstrap(tmp_path: Path) -> None:
    """``envoy --mode validate``: the real binary parses every route, matcher and filter (a
    rendering mistake fails here, in the fast tier, not when a plane starts)."""
    import subprocess

    from pipelines.serving.dataplane.envoy import bootstrap_yaml
    from pipelines.serving.dataplane.local import envoy_binary

    (tmp_path / "split").mkdir()  # Envoy watches its runtime directory
    plane = _plane(runtime_root=str(tmp_path / "split"), access_log=str(tmp_path / "a.log"))
    (tmp_path / "envoy.yaml").write_text(bootstrap_yaml(plane))
    cmd = [envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")]
    done = subprocess.run([*cmd, "-l", "error"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_unknown_models_and_labels_are_answered_by_the_plane() -> None:
    routes = _routes(render_bootstrap(_plane()))
    names = [r["name"] for r in routes]
    assert names.index("label-canary") < names.index("unknown-label") < names.index("model-call")
    assert names[-2:] == ["unknown-model", "no-route"]
    assert names[0] == "heartbeat" and routes[0]["direct_response"]["status"] == 200
    # A wrong method on a model path is answered before any route that reaches a replica.
    assert names[1:3] == ["wrong-method-call", "wrong-method-status"]
    for r, allowed in zip(routes[1:3], ("^(POST)$", "^(GET|HEAD)$"), strict=True):
        assert r["direct_response"]["status"] == 405
        (method,) = r["match"]["headers"]
        assert method["name"] == ":method" and method["invert_match"] is True
        assert method["string_match"]["safe_regex"]["regex"] == allowed
    for r in routes[1:]:
        if "direct_response" in r:
            assert r["direct_response"]["status"] == (405 if r["name"].startswith("wrong") else 404)
            assert "error" in json.loads(r["direct_response"]["body"]["inline_string"])


def test_every_access_log_line_carries_the_judges_fields() -> None:
    boot = render_bootstrap(_plane())
    for lst in boot["static_resources"]["listeners"]:
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        fmt = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
        for field in ("cluster", "replica", "code", "duration_us", "request_id", "key", "scores"):
            assert field in fmt
        assert fmt["listener"] == lst["name"]
        filters = [f["name"] for f in hcm["http_filters"]]
        assert filters == [
            "envoy.filters.http.buffer",
            "envoy.filters.http.lua",
            "envoy.filters.http.router",
        ]


def test_the_kubernetes_plane_resolves_the_pools_services() -> None:
    s = load_settings({"MLOPS_PROFILE": "kubernetes", "MLOPS_HOME": "/tmp/x"})
    plane = kubernetes_plane(s)
    assert [(p.label, p.endpoints, p.dns) for p in plane.pools] == [
        (pool, ((f"tf-serving-{pool}.mlops.svc.cluster.local", 8501),), True) for pool in POOLS
    ]
    boot = render_bootstrap(plane)
    assert {c["type"] for c in boot["static_resources"]["clusters"][:3]} == {"STRICT_DNS"}
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # The heartbeat checks the listener on loopback, not on the address it binds for clients.
    beat = {c["name"]: c for c in boot["static_resources"]["clusters"]}["heartbeat"]
    addr = beat["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert addr["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}


def test_the_heartbeat_is_envoy_checking_its_own_listener_and_can_be_turned_off() -> None:
    boot = render_bootstrap(_plane())
    beat = {c["name"]: c for c in boot["static_resources"]["clusters"]}["heartbeat"]
    check = beat["health_checks"][0]
    assert check["http_health_check"]["path"] == "/_mlops/heartbeat"
    assert check["interval"] == check["no_traffic_interval"] == "10.000s"
    addr = beat["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert addr["socket_address"] == {"address": "127.0.0.1", "port_value": 8601}
    fmt = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    log = fmt["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log["plane"] == "%ENVIRONMENT(MLOPS_PLANE_STARTED)%"
    off = render_bootstrap(_plane(cfg=DataPlaneSettings(heartbeat_s=0)))
    assert "heartbeat" not in {c["name"] for c in off["static_resources"]["clusters"]}
    assert "heartbeat" not in [r["name"] for r in _routes(off)]


@pytest.mark.parametrize("bad", [-1, 101, 2.5, "5", None, True])
def test_a_split_envoy_would_take_silently_is_refused(bad: object) -> None:
    with pytest.raises(SplitError, match=r"integer 0\.\.100"):
        Split(bad)  # type: ignore[arg-type]


def test_weights_always_sum_to_100_and_the_baseline_matches_the_canary() -> None:
    for w in range(101):
        keys = Split(w).runtime_keys()
        stable, baseline, canary = (
            int(keys[f"mlops.weights.{p}"]) for p in ("stable", "baseline", "canary")
        )
        assert stable + baseline + canary == 100 and canary == w
        assert baseline == min(w, 100 - w)  # as much as the canary, at most what is left
        assert Split.from_keys(keys) == Split(w)
    assert Split(5).runtime_keys()["mlops.weights.stable"] == "90"
    zero = {f"mlops.weights.{p}": "0" for p in ("stable", "baseline", "canary")}
    with pytest.raises(SplitError, match="not a split"):
        Split.from_keys(zero)
    with pytest.raises(SplitError, match="incomplete"):
        Split.from_keys({"mlops.weights.stable": "100", "mlops.weights.canary": "0"})


def test_the_runtime_directory_swaps_atomically_like_kubelet(tmp_path: Path) -> None:
    rd = RuntimeDirectory(tmp_path / "split")
    assert rd.read() == Split()  # nothing written yet: all traffic to stable
    rd.write(Split(25))
    first = (tmp_path / "split" / "..data").resolve()
    rd.write(Split(50, shadow=10))
    assert rd.read() == Split(50, shadow=10)
    assert not first.exists()  # the old generation is gone once the symlink moved
    assert (tmp_path / "split" / "mlops.weights.canary").read_text() == "50"
    dirs = [p.name for p in (tmp_path / "split").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(dirs) == 1


def _line(**kw: object) -> str:
    rec = {
        "time": "1796116871.437",
        "listener": "primary",
        "cluster": "canary",
        "replica": "127.0.0.1:8503",
        "code": 200,
        "duration_us": 1500,
        "path": "/v1/models/fraud_detector:predict",
        "request_id": "r1",
        "key": "k1",
        "scores": "[0.25]",
    }
    rec.update(kw)
    return json.dumps(rec)


def test_access_log_lines_become_samples() -> None:
    s = parse_line(_line())
    assert s is not None
    assert (s.label, s.code, s.latency_ms, s.scores, s.replica) == (
        "canary",
        200,
        1.5,
        (0.25,),
        "127.0.0.1:8503",
    )
    nan = parse_line(_line(scores="[NaN, [0.5], [1, 2]]"))
    assert nan is not None and nan.scores[1] == 0.5
    assert nan.scores[0] != nan.scores[0] and nan.scores[2] != nan.scores[2]
    assert parse_line(_line(scores="-")).scores == ()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[]",
        _line(cluster="-"),  # answered by the plane itself (400, 404, 413)
        _line(path="/v1/models/fraud_detector"),  # a status request
        _line(time="never"),
    ],
)
def test_lines_that_are_not_model_calls_are_skipped(line: str) -> None:
    assert parse_line(line) is None


def test_a_window_keeps_primary_requests_only() -> None:
    samples = [
        parse_line(_line()),
        parse_line(_line(listener="shadow")),
        parse_line(_line(cluster="stable")),
    ]
    window = by_label([s for s in samples if s is not None])
    assert len(window["canary"]) == 1 and len(window["stable"]) == 1
