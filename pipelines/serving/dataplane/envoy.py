"""Envoy's bootstrap for the data plane, rendered from settings (pure), and the local process.

One renderer serves both worlds: locally the pools are STATIC endpoints (the replicas' ports),
in Kubernetes they are STRICT_DNS names of headless Services. Routes are TF Serving's REST
paths; the split reads runtime keys ``mlops.weights.{stable,canary}`` from a disk layer that
only the controller writes (see :mod:`pipelines.serving.dataplane.split`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import DataPlaneSettings, Settings

LABELS = ("stable", "canary")  # the labels clients and the registry know
# Pools, in the split's order. The baseline pool serves the stable version at the canary's
# weight, on as many replicas: the judge compares canary with baseline, two pools of the same
# size under the same load, not with stable, whose replicas run warm at many times the load
# (measured here: 1.3-1.5x lower latency for the same model; Kayenta's baseline does this).
POOLS = ("stable", "baseline", "canary")
WEIGHT_KEY = "mlops.weights"  # runtime key prefix: mlops.weights.stable, mlops.weights.canary
SHADOW_KEY = "mlops.shadow.percent"  # share of primary requests mirrored to the candidate
LUA_FILE = Path(__file__).with_name("filter.lua")
SERVED_LABEL = "x-served-label"  # response header naming the label that answered
# Histogram buckets of upstream_rq_time (ms) fine enough for a ~1 ms model server.
LATENCY_BUCKETS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500, 10000)

# Envoy health-checks its own listener on this path every ``dataplane.heartbeat_s``: each check is
# a line in the access log, written by the same process through the same log (and collector)
# as the requests. An hour whose log holds no heartbeat was not observed: the data plane was
# down or its log never arrived; an hour with heartbeats and no requests had no traffic.
HEARTBEAT_PATH = "/_mlops/heartbeat"
# When the running Envoy started (epoch s), in every line: a gap in the heartbeats that ends at
# a start was the data plane being down, one within a run is lost log.
PLANE_STARTED_ENV = "MLOPS_PLANE_STARTED"

# One JSON object per request: what the judge, the shadow stage and an operator read.
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME(%s.%3f)%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "replica": "%UPSTREAM_HOST%",
    "code": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_us": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
    "upstream_us": "%COMMON_DURATION(US_TX_BEG:US_RX_END:us)%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "key": "%REQ(X-REQUEST-KEY)%",
    "scores": "%DYNAMIC_METADATA(mlops:scores)%",
    "instances": "%DYNAMIC_METADATA(mlops:instances)%",
    "version": "%RESP(X-MODEL-VERSION)%",
    "plane": f"%ENVIRONMENT({PLANE_STARTED_ENV})%",
}


@dataclass(frozen=True)
class Pool:
    """The replicas of one label: ``host:port`` endpoints, or one DNS name (headless Service)."""

    label: str
    endpoints: tuple[tuple[str, int], ...]
    dns: bool = False


@dataclass(frozen=True)
class Plane:
    """Everything the bootstrap depends on."""

    model: str
    cfg: DataPlaneSettings
    pools: tuple[Pool, ...]
    listen: tuple[str, int]
    admin: tuple[str, int]
    shadow: tuple[str, int]
    runtime_root: str  # Envoy's disk layer symlink_root
    access_log: str
    static_weights: dict[str, int] = field(
        default_factory=lambda: {"stable": 100, "baseline": 0, "canary": 0}
    )


@cache
def _lua() -> str:
    return LUA_FILE.read_text()


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _error_route(name: str, regex: str, status: int, message: str) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"safe_regex": {"regex": regex}},
        "direct_response": {
            "status": status,
            "body": {"inline_string": json.dumps({"error": message})},
        },
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}}
        ],
    }


def _wrong_method_route(name: str, regex: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """405 with an ``allow`` header for a path matched by ``regex`` under any other method."""
    route = _error_route(
        name, regex, 405, f"Method not allowed: this path takes {' or '.join(allowed)}"
    )
    route["match"]["headers"] = [
        {
            "name": ":method",
            "string_match": {"safe_regex": {"regex": f"^({'|'.join(allowed)})$"}},
            "invert_match": True,
        }
    ]
    route["response_headers_to_add"].append(
        {"header": {"key": "allow", "value": ", ".join(allowed)}}
    )
    return route


def _routes(plane: Plane, primary: bool) -> list[dict[str, Any]]:
    """TF Serving's REST paths for ``plane.model``: the split for unpinned model calls, a label
    path to its own pool, metadata and version paths to stable, a TF-Serving-style 404 for
    anything else (unknown model or label), so bad requests never reach a replica."""
    cfg, m = plane.cfg, re.escape(plane.model)
    tail = r"(/metadata|:predict|:classify|:regress)?"
    timeout = _duration(cfg.request_timeout_s)
    retry = {
        "retry_on": "connect-failure,reset,refused-stream",
        "num_retries": cfg.retries,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }

    def to(cluster: str) -> dict[str, Any]:
        return {"cluster": cluster, "timeout": timeout, "retry_policy": retry}

    def labelled(label: str) -> dict[str, Any]:
        return {
            "name": f"label-{label}",
            "match": {"safe_regex": {"regex": rf"^/v1/models/{m}/labels/{label}{tail}$"}},
            "route": to(label),
            "response_headers_to_add": [{"header": {"key": SERVED_LABEL, "value": label}}],
        }

    split: dict[str, Any] = {
        "timeout": timeout,
        "retry_policy": retry,
        "hash_policy": [{"header": {"header_name": "x-request-key"}}],
        "weighted_clusters": {
            "runtime_key_prefix": WEIGHT_KEY,
            "use_hash_policy": True,
            "clusters": [
                {
                    "name": label,
                    "weight": plane.static_weights[label],
                    "response_headers_to_add": [{"header": {"key": SERVED_LABEL, "value": label}}],
                }
                for label in POOLS
            ],
        },
    }
    if primary:
        split["request_mirror_policies"] = [
            {
                "cluster": "shadow",
                "runtime_fraction": {
                    "default_value": {"numerator": 0, "denominator": "HUNDRED"},
                    "runtime_key": SHADOW_KEY,
                },
            }
        ]
    # A wrong method is answered here, as TF Serving would (405, its JSON error body): it
    # reached a replica before, whose 501 counted as a 5xx and tripped outlier ejection.
    routes = [
        _wrong_method_route(
            "wrong-method-call",
            rf"^/v1/models/{m}(/labels/[^/:]*|/versions/\d+)?:(predict|classify|regress)$",
            ("POST",),
        ),
        _wrong_method_route(
            "wrong-method-status",
            rf"^/v1/models/{m}(/labels/[^/:]*|/versions/\d+)?(/metadata)?$",
            ("GET", "HEAD"),
        ),
        *(labelled(label) for label in LABELS),
    ]
    if primary and cfg.heartbeat_s > 0:
        routes.insert(
            0,
            {
                "name": "heartbeat",
                "match": {"path": HEARTBEAT_PATH},
                "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
            },
        )
    routes.append(
        _error_route(
            "unknown-label",
            rf"^/v1/models/{m}/labels/[^/:]*{tail}$",
            404,
            f"Unrecognized servable version label for model {plane.model}; "
            f"the data plane serves labels {', '.join(LABELS)}",
        )
    )
    if primary:
        routes.append(
            {
                "name": "model-call",
                "match": {"safe_regex": {"regex": rf"^/v1/models/{m}:(predict|classify|regress)$"}},
                "route": split,
            }
        )
        routes.append(
            {
                "name": "model-status",
                "match": {"safe_regex": {"regex": rf"^/v1/models/{m}(/versions/\d+)?{tail}$"}},
                "route": to("stable"),
                "response_headers_to_add": [{"header": {"key": SERVED_LABEL, "value": "stable"}}],
            }
        )
    else:  # the shadow listener answers mirrored model calls from the candidate's pool
        routes.append(
            {
                "name": "shadow-call",
                "match": {"safe_regex": {"regex": rf"^/v1/models/{m}:(predict|classify|regress)$"}},
                "route": to("canary"),
            }
        )
    routes.append(
        _error_route(
            "unknown-model",
            r"^/v1/models/.*",
            404,
            f"Servable not found: the data plane serves model {plane.model} only",
        )
    )
    routes.append(_error_route("no-route", ".*", 404, "Malformed request: no such path"))
    return routes


def _listener(plane: Plane, name: str, where: tuple[str, int], primary: bool) -> dict[str, Any]:
    cfg = plane.cfg
    return {
        "name": name,
        "address": _addr(*where),
        "per_connection_buffer_limit_bytes": cfg.max_body_bytes + 65536,
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "generate_request_id": True,
                            "preserve_external_request_id": True,
                            "request_timeout": _duration(cfg.request_timeout_s * 2),
                            "access_log": [
                                {
                                    "name": "envoy.access_loggers.file",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "access_loggers.file.v3.FileAccessLog",
                                        "path": plane.access_log,
                                        "log_format": {
                                            "json_format": {
                                                **ACCESS_LOG_FORMAT,
                                                "listener": name,
                                            }
                                        },
                                    },
                                }
                            ],
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.buffer",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.http.buffer.v3.Buffer",
                                        "max_request_bytes": cfg.max_body_bytes,
                                    },
                                },
                                {
                                    "name": "envoy.filters.http.lua",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.http.lua.v3.Lua",
                                        "default_source_code": {"inline_string": _lua()},
                                    },
                                },
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.http.router.v3.Router"
                                    },
                                },
                            ],
                            "route_config": {
                                "name": name,
                                "virtual_hosts": [
                                    {
                                        "name": plane.model,
                                        "domains": ["*"],
                                        "routes": _routes(plane, primary),
                                    }
                                ],
                            },
                        },
                    }
                ]
            }
        ],
    }


def _cluster(plane: Plane, pool: Pool) -> dict[str, Any]:
    cfg = plane.cfg
    interval = _duration(cfg.health_interval_s)
    return {
        "name": pool.label,
        "type": "STRICT_DNS" if pool.dns else "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {
            "cluster_name": pool.label,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _addr(h, p)}} for h, p in pool.endpoints
                    ]
                }
            ],
        },
        # TF Serving's status endpoint: 200 once the model is known to the replica.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": interval,
                "no_traffic_interval": interval,  # the canary at weight 0 is still watched
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "http_health_check": {"path": f"/v1/models/{plane.model}"},
            }
        ],
        "outlier_detection": {
            "consecutive_5xx": cfg.eject_after_5xx,
            "consecutive_gateway_failure": cfg.eject_after_5xx,
            "interval": interval,
            "base_ejection_time": _duration(cfg.ejection_s),
            "max_ejection_percent": 50,
        },
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
    }


def _heartbeat_cluster(plane: Plane) -> dict[str, Any]:
    """Envoy's health check of its own primary listener (see ``HEARTBEAT_PATH``)."""
    host, port = plane.listen
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    every = _duration(plane.cfg.heartbeat_s)
    return {
        "name": "heartbeat",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "heartbeat",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(host, port)}}]}],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": every,
                "no_traffic_interval": every,  # no request is ever routed to it
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": HEARTBEAT_PATH},
            }
        ],
    }


def render_bootstrap(plane: Plane) -> dict[str, Any]:
    """The whole Envoy bootstrap as a JSON-able dict."""
    shadow_cluster = {
        "name": "shadow",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "shadow",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(*plane.shadow)}}]}],
        },
    }
    return {
        "node": {"id": "mlops-dataplane", "cluster": "mlops-dataplane"},
        "admin": {"address": _addr(*plane.admin)},
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": {}},
                {"name": "split", "disk_layer": {"symlink_root": plane.runtime_root}},
            ]
        },
        "stats_config": {
            "histogram_bucket_settings": [
                {"match": {"suffix": "upstream_rq_time"}, "buckets": list(LATENCY_BUCKETS_MS)}
            ]
        },
        "static_resources": {
            "listeners": [
                _listener(plane, "primary", plane.listen, primary=True),
                _listener(plane, "shadow", plane.shadow, primary=False),
            ],
            "clusters": [_cluster(plane, p) for p in plane.pools]
            + [shadow_cluster]
            + ([_heartbeat_cluster(plane)] if plane.cfg.heartbeat_s > 0 else []),
        },
    }


def bootstrap_yaml(plane: Plane) -> str:
    return yaml.safe_dump(render_bootstrap(plane), sort_keys=False, width=100)


# Kubernetes: the Envoy Deployment of infra/k8s/base/envoy.yaml.
K8S_RUNTIME_ROOT = "/etc/envoy/runtime/..data"  # the split ConfigMap (kubelet's symlink swap)


def kubernetes_plane(settings: Settings) -> Plane:
    """The plane as the Envoy Deployment runs it: pools are the per-label headless Services
    named by ``serving.pool_urls``; the access log goes to stdout for the log collector."""
    from urllib.parse import urlsplit

    pools = []
    for label in POOLS:
        url = settings.serving.pool_urls.get(label)
        if not url:
            raise ValueError(f"serving.pool_urls has no URL for label {label!r}")
        u = urlsplit(url)
        pools.append(Pool(label, ((u.hostname or "", u.port or 8501),), dns=True))
    return Plane(
        model=settings.mlflow.model_name,
        cfg=settings.dataplane,
        pools=tuple(pools),
        listen=("0.0.0.0", 8080),
        admin=("127.0.0.1", 9901),
        shadow=("127.0.0.1", settings.dataplane.shadow_port),
        runtime_root=K8S_RUNTIME_ROOT,
        access_log="/dev/stdout",
    )


def kubernetes_bootstrap_yaml(settings: Settings) -> str:
    """The bootstrap of the Envoy Deployment (the ConfigMap ``mlops-envoy-bootstrap``)."""
    return bootstrap_yaml(kubernetes_plane(settings))
