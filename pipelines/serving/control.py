"""The serving-control interface: each label's model config, the traffic split, and the data
plane's evidence, behind one Protocol with a local and a remote implementation.

Built once per stage in the composition root (:func:`pipelines.stages.serving_control`) and
passed to the rollout, shadow and canary code, which never start processes or build clients
of their own. Labels follow TF Serving's two phases: load a version, wait until AVAILABLE on
every replica, then label it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import requests

from pipelines.config import Settings
from pipelines.serving import model_config
from pipelines.serving.client import ServingClient, ServingUnavailable, rest_tls
from pipelines.serving.dataplane.envoy import LABELS, POOLS
from pipelines.serving.dataplane.evidence import Sample, parse_lines
from pipelines.serving.dataplane.split import ConfigMapSplit, Split, SplitStore
from pipelines.store import ObjectStore, open_store, storage_options

log = logging.getLogger(__name__)
CONFIG_FILE = "models.config"  # each label's TF Serving config: <root>/<label>/models.config


class ServingControl(Protocol):
    model: str
    model_dir: Path  # where version directories are staged (<base_dir>/<model>)

    def ensure_running(self) -> None:
        """Local: replicas and Envoy up (idempotent). Remote: nothing to start."""

    def endpoint(self) -> str:
        """The data plane's client URL (TF Serving's REST paths)."""

    def pool(self, label: str) -> model_config.ModelEntry | None:
        """The model's entry in ``label``'s config (None: that pool serves nothing)."""

    def clients(self, label: str) -> list[ServingClient]:
        """REST clients of the pool's replicas (remote: of its Service)."""

    def set_pool(self, label: str, entry: model_config.ModelEntry | None) -> None:
        """Write ``label``'s config; its replicas pick it up on their next poll."""

    def wait_version(self, label: str, version: int, timeout: float) -> None:
        """Until ``version`` is AVAILABLE on every replica of ``label``."""

    def wait_label(self, label: str, version: int, timeout: float) -> None:
        """Until ``label`` points at ``version`` on every replica of that pool."""

    def split(self) -> Split:
        """The traffic split as stored (the source of truth Envoy reads)."""

    def set_split(self, split: Split) -> None:
        """Store a validated split and check it reads back."""

    def window(
        self, since: float, until: float | None = None, request_ids: set[str] | None = None
    ) -> list[Sample]:
        """The data plane's records of requests from ``since`` (waiting for ``request_ids``)."""

    def access_log_lines(self, since: float) -> Iterator[str]:
        """The data plane's raw access-log lines that may hold requests from ``since`` on
        (the serving log's source; callers filter by time)."""

    def topology(self) -> dict[str, Any]:
        """Replicas per label and the data plane's addresses, for people and reports."""


def _wait(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            done, last = check()
        except (requests.RequestException, KeyError, ValueError) as exc:
            done, last = False, str(exc)  # a replica restarting answers nothing for a moment
        if done:
            return
        time.sleep(0.2)
    raise ServingUnavailable(f"{what} not reached after {timeout:.0f} s (last: {last}).")


class _Pools(ABC):
    """Waiting on the replicas of a pool, given their REST clients."""

    model: str

    @abstractmethod
    def clients(self, label: str) -> list[ServingClient]:
        """REST clients of the pool's replicas (remote: of its Service)."""

    def wait_version(self, label: str, version: int, timeout: float) -> None:
        def check() -> tuple[bool, str]:
            states = []
            for c in self.clients(label):
                state, err = c.version_state(self.model, version)
                if state == "END":
                    raise ServingUnavailable(
                        f"Version {version} of {self.model} failed to load on a {label} "
                        f"replica ({c.base_url}): {err}"
                    )
                states.append(state)
            return all(s == "AVAILABLE" for s in states), ",".join(states)

        _wait(check, f"Version {version} AVAILABLE on every {label} replica", timeout)

    def wait_label(self, label: str, version: int, timeout: float) -> None:
        def check() -> tuple[bool, str]:
            got = [c.label_version(self.model, label) for c in self.clients(label)]
            return all(v == version for v in got), str(got)

        _wait(check, f"Label {label} -> {version} on every {label} replica", timeout)


class LocalServing(_Pools):
    """Replicas and Envoy on this machine (:class:`LocalPlane`); configs are local files."""

    def __init__(self, settings: Settings):
        from pipelines.serving.dataplane.local import LocalPlane

        self.model = settings.mlflow.model_name
        self.model_dir = Path(settings.serving.base_dir) / self.model
        self.plane = LocalPlane(settings.serving, settings.dataplane, self.model)
        self.timeout = settings.dataplane.request_timeout_s

    def ensure_running(self) -> None:
        self.plane.ensure_running()

    def endpoint(self) -> str:
        return self.plane.endpoint()

    def clients(self, label: str) -> list[ServingClient]:
        topo = self.plane.topology()
        return [ServingClient(self.plane.replica_url(n, topo)) for n in self.plane.replicas(label)]

    def pool(self, label: str) -> model_config.ModelEntry | None:
        return model_config.entry(self.plane.config_file(label), self.model)

    def set_pool(self, label: str, entry: model_config.ModelEntry | None) -> None:
        path = self.plane.config_file(label)
        entries = [e for e in model_config.read(path) if e.name != self.model]
        model_config.write(path, entries + ([entry] if entry else []))

    def split(self) -> Split:
        return self.plane.runtime.read()

    def set_split(self, split: Split) -> None:
        self.plane.runtime.write(split)
        if self.plane.runtime.read() != split:
            raise ServingUnavailable(f"The stored split does not read back as {split}.")
        self._wait_envoy_split(split)

    def _wait_envoy_split(self, split: Split, timeout: float = 5.0) -> None:
        """When Envoy runs, wait until its runtime shows the split (the disk layer reloads on
        the symlink swap within milliseconds); a stopped Envoy reads it when it starts."""
        if self.plane.envoy_pid() is None:
            return
        want = split.runtime_keys()
        deadline = time.monotonic() + timeout
        got: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                entries = requests.get(f"{self.plane.admin_url()}/runtime", timeout=2).json()
                got = {k: v.get("final_value") for k, v in entries.get("entries", {}).items()}
            except (requests.RequestException, ValueError):
                got = {}
            if all(got.get(k) == v for k, v in want.items()):
                return
            time.sleep(0.02)
        raise ServingUnavailable(f"Envoy's runtime shows {got}, not the split {want}.")

    def window(
        self, since: float, until: float | None = None, request_ids: set[str] | None = None
    ) -> list[Sample]:
        log_ = self.plane.access_log
        if request_ids:
            got = log_.wait_for(request_ids, since, timeout=self.timeout)
            return [s for s in got if until is None or s.t < until]
        return log_.samples(since, until)

    def access_log_lines(self, since: float) -> Iterator[str]:
        path = self.plane.access_log.path
        if not path.exists():
            return
        with open(path, "rb") as fh:
            for raw in fh:
                if raw.endswith(b"\n"):  # a line still being written is not a record yet
                    yield raw.decode("utf-8", errors="replace")

    def topology(self) -> dict[str, Any]:
        topo = self.plane.topology()
        return {
            "data_plane": self.plane.endpoint(),
            "admin": self.plane.admin_url(),
            "access_log": str(self.plane.access_log.path),
            "replicas": {
                label: [self.plane.replica_url(n, topo) for n in self.plane.replicas(label)]
                for label in POOLS
            },
        }


def publish_versions(target: ObjectStore, model_dir: Path, name: str, versions: list[int]) -> None:
    """Copy each version directory not yet under ``target`` (``<name>/<v>/``), a marker last."""
    for v in versions:
        prefix = f"{name}/{v}"
        if target.exists(f"{prefix}/{PUBLISHED}"):
            continue
        if not (model_dir / str(v) / "saved_model.pb").is_file():
            raise ServingUnavailable(
                f"Cannot publish version {v}: {model_dir / str(v)} holds no SavedModel."
            )
        target.put_dir(model_dir / str(v), prefix)
        target.write_text(f"{prefix}/{PUBLISHED}", "")


PUBLISHED = "_published"  # marker written after a version directory's files


def evidence_partitions(
    since: float, now: float, lookback_s: float = 3600.0, max_hours: int = 7 * 24
) -> list[str] | None:
    """The hour partitions under ``dataplane.evidence_uri`` (``dt=YYYY-MM-DD/hour=HH``, UTC,
    oldest first) that can hold access-log lines from ``since`` on, as of ``now``.

    The log collector (infra/k8s/logging) names each object after the time of its *first* line
    (Fluent Bit's s3 output: the time in ``s3_key_format`` is that of the first record in the
    file) and uploads it ``upload_timeout`` (60 s) after opening it: a line written at t is in
    the partition of hour(t) or of an earlier hour, never a later one, and lands after t. So the
    partitions run from the hour of ``since - lookback_s`` (the stretch of log one object can
    span: 60 s, or more when the collector catches up on a backlog after a restart; one hour
    leaves room for that) to the hour of ``now`` (no object is named after a line that is not
    written yet). Empty when ``since`` is more than ``lookback_s`` ahead of ``now``. None when
    the range spans more than ``max_hours`` hours (a backfill of an old window): the caller then
    lists every key, as for unpartitioned keys, rather than one listing per hour; nothing is
    left out either way.
    """
    first = int((since - lookback_s) // 3600)
    last = int(now // 3600)
    if last - first + 1 > max_hours:
        return None
    return [
        time.strftime("dt=%Y-%m-%d/hour=%H", time.gmtime(h * 3600)) for h in range(first, last + 1)
    ]


class RemoteServing(_Pools):
    """TF Serving pools and Envoy in a cluster: each label's config is published to
    ``serving.publish_root`` (the pools sync it), the split is the ConfigMap Envoy mounts,
    evidence is the access log a collector ships to ``dataplane.evidence_uri``."""

    def __init__(self, settings: Settings, split_store: SplitStore | None = None):
        s = settings.serving
        if not s.publish_root:
            raise ServingUnavailable(
                "serving.mode is 'remote' but serving.publish_root is not set."
            )
        missing = [label for label in POOLS if not s.pool_urls.get(label)]
        if missing:
            raise ServingUnavailable(f"serving.pool_urls has no URL for {', '.join(missing)}.")
        if not settings.dataplane.url:
            raise ServingUnavailable("serving.mode is 'remote' but dataplane.url is not set.")
        self.settings = settings
        self.model = settings.mlflow.model_name
        self.model_dir = Path(s.base_dir) / self.model
        self.target = ObjectStore(s.publish_root, storage_options(settings.store))
        self.splits: SplitStore = split_store or ConfigMapSplit(
            settings.dataplane.split_configmap, settings.dataplane.namespace
        )

    def ensure_running(self) -> None:
        return None

    def endpoint(self) -> str:
        return str(self.settings.dataplane.url).rstrip("/")

    def clients(self, label: str) -> list[ServingClient]:
        verify, cert = rest_tls(self.settings.serving)
        return [ServingClient(self.settings.serving.pool_urls[label], verify=verify, cert=cert)]

    def pool(self, label: str) -> model_config.ModelEntry | None:
        key = f"{label}/{CONFIG_FILE}"
        if not self.target.exists(key):
            return None
        return next(
            (e for e in model_config.parse(self.target.read_text(key)) if e.name == self.model),
            None,
        )

    def set_pool(self, label: str, entry: model_config.ModelEntry | None) -> None:
        """Version directories first (each completed by a marker), then the label's config
        with ``base_path`` as TF Serving sees it: a pool never reads a config naming a
        version whose files are not all there."""
        if entry is not None:
            publish_versions(self.target, self.model_dir, self.model, entry.versions)
            entry = model_config.ModelEntry(
                entry.name,
                self.settings.serving.model_base_path or self.target.uri(self.model),
                entry.versions,
                entry.labels,
            )
        key = f"{label}/{CONFIG_FILE}"
        entries = (
            [e for e in model_config.parse(self.target.read_text(key)) if e.name != self.model]
            if self.target.exists(key)
            else []
        )
        self.target.write_text(key, model_config.render(entries + ([entry] if entry else [])))

    def split(self) -> Split:
        return self.splits.read()

    def set_split(self, split: Split) -> None:
        """Patch the ConfigMap when it differs (every poke re-asserts it: a ``kubectl apply``
        of the base manifests writes 100/0 back), then wait for kubelet to sync it."""
        if self.splits.read() == split:
            return
        self.splits.write(split)
        if self.splits.read() != split:
            raise ServingUnavailable(f"The split ConfigMap does not read back as {split}.")
        # kubelet syncs a mounted ConfigMap within about a minute; wait before judging.
        time.sleep(self.settings.dataplane.split_propagation_s)

    def window(
        self, since: float, until: float | None = None, request_ids: set[str] | None = None
    ) -> list[Sample]:
        return [
            s
            for s in parse_lines(self.access_log_lines(since))
            if s.t >= since and (until is None or s.t < until)
        ]

    def access_log_lines(self, since: float) -> Iterator[str]:
        """The lines of the objects under ``dataplane.evidence_uri`` modified at or after
        ``since``. Keys partitioned the way the log collector writes them
        (``dt=YYYY-MM-DD/hour=HH/``) are listed only for the hours
        :func:`evidence_partitions` names; any other key is listed and read as before."""
        uri = self.settings.dataplane.evidence_uri
        if not uri:
            raise ServingUnavailable("dataplane.evidence_uri is not set: no evidence to judge.")
        store = open_store(self.settings.store.model_copy(update={"root": uri}))
        # s3fs caches listings per process and the collector keeps adding objects: a cached
        # listing of dt=D/ would hide the hour partitions created since.
        store.fs.invalidate_cache()
        hours = evidence_partitions(since, time.time())
        if hours is None:
            keys = store.list("", recursive=True)
        else:
            keys = [
                key
                for top in store.list("")
                if not top.startswith("dt=")
                for key in store.list(top, recursive=True)
            ]
            keys += [key for hour in hours for key in store.list(hour, recursive=True)]
        for key in sorted(keys):
            if store.modified(key) < since:
                continue  # a shipped file older than the window holds none of its lines
            yield from store.read_text(key).splitlines()

    def topology(self) -> dict[str, Any]:
        return {
            "data_plane": self.endpoint(),
            "replicas": {label: [self.settings.serving.pool_urls[label]] for label in POOLS},
            "split": f"ConfigMap {self.settings.dataplane.namespace}/"
            f"{self.settings.dataplane.split_configmap}",
        }


def build(settings: Settings) -> ServingControl:
    """The serving control of this profile (called from the composition root only)."""
    if settings.serving.mode == "remote":
        return RemoteServing(settings)
    return LocalServing(settings)


def labels_of(control: ServingControl) -> dict[str, int]:
    """Where ``stable`` and ``canary`` point: each pool's own label."""
    out = {}
    for label in LABELS:
        entry = control.pool(label)
        if entry and label in entry.labels:
            out[label] = int(entry.labels[label])
    return out
