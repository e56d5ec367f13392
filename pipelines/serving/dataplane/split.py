"""The traffic split: the one value the canary controller writes and Envoy reads.

The split is a set of runtime keys (``mlops.weights.stable``, ``mlops.weights.canary``,
``mlops.shadow.percent``) in a directory laid out as kubelet lays out a ConfigMap volume:
a timestamped directory, a ``..data`` symlink swapped atomically. Envoy's runtime disk layer
watches that symlink and reloads on the swap. Locally the controller writes the directory
itself; in Kubernetes it patches the ConfigMap and kubelet writes it. Either way the split
lives outside Envoy, so a restarted Envoy comes back at the same split.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.serving.dataplane.envoy import SHADOW_KEY, WEIGHT_KEY

DATA = "..data"


class SplitError(ValueError):
    """A split that must never be written (Envoy would not refuse it)."""


@dataclass(frozen=True)
class Split:
    """Canary weight and shadow share, both in percent. The baseline pool (the stable version
    on a pool like the canary's) takes as much as the canary, at most what is left."""

    canary: int = 0
    shadow: int = 0

    def __post_init__(self) -> None:
        # Envoy accepts any runtime value and silently falls back to the static weight for a
        # bad one, and answers 404 to every request when both weights are 0: check here.
        for name, value in (("canary weight", self.canary), ("shadow share", self.shadow)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                raise SplitError(f"The {name} must be an integer 0..100, got {value!r}.")

    @property
    def baseline(self) -> int:
        return min(self.canary, 100 - self.canary)

    @property
    def stable(self) -> int:
        return 100 - self.canary - self.baseline

    def runtime_keys(self) -> dict[str, str]:
        """The runtime keys and values; the weights always sum to 100, never 0/0/0."""
        return {
            f"{WEIGHT_KEY}.stable": str(self.stable),
            f"{WEIGHT_KEY}.baseline": str(self.baseline),
            f"{WEIGHT_KEY}.canary": str(self.canary),
            SHADOW_KEY: str(self.shadow),
        }

    @classmethod
    def from_keys(cls, keys: dict[str, str]) -> Split:
        try:
            weights = [
                int(keys[f"{WEIGHT_KEY}.{pool}"]) for pool in ("stable", "baseline", "canary")
            ]
            shadow = int(keys.get(SHADOW_KEY, "0"))
        except (KeyError, ValueError) as exc:
            raise SplitError(f"The stored split is incomplete or not integers: {exc}") from None
        split = cls(weights[2], shadow)
        if [split.stable, split.baseline, split.canary] != weights:
            raise SplitError(
                f"The stored weights {'/'.join(map(str, weights))} (stable/baseline/canary) are "
                f"not a split this controller writes."
            )
        return split


class SplitStore(Protocol):
    """Where the split lives: read it, write it (validated)."""

    def read(self) -> Split: ...

    def write(self, split: Split) -> None: ...


class RuntimeDirectory:
    """The split as Envoy's disk layer reads it, written with kubelet's atomic symlink swap."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def symlink_root(self) -> Path:
        """What Envoy's ``disk_layer.symlink_root`` names."""
        return self.root / DATA

    def read(self) -> Split:
        if not self.symlink_root.exists():
            return Split()
        return Split.from_keys(
            {p.name: p.read_text().strip() for p in self.symlink_root.iterdir() if p.is_file()}
        )

    def write(self, split: Split) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:8]}"
        new = self.root / stamp
        new.mkdir()
        for key, value in split.runtime_keys().items():
            (new / key).write_text(value)
        old = os.readlink(self.symlink_root) if self.symlink_root.is_symlink() else None
        tmp = self.root / f"..data_tmp.{uuid.uuid4().hex[:8]}"
        tmp.symlink_to(stamp)
        os.replace(tmp, self.symlink_root)  # the one atomic step Envoy reacts to
        for key in split.runtime_keys():
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(f"{DATA}/{key}")
        if old and old != stamp:
            shutil.rmtree(self.root / old, ignore_errors=True)


class ConfigMapSplit:
    """The split as the ConfigMap the Envoy Deployment mounts (``dataplane.split_configmap``),
    patched through the Kubernetes API: one source of truth for every Envoy replica."""

    def __init__(self, name: str, namespace: str, api: object | None = None):
        self.name, self.namespace = name, namespace
        self._api = api

    def _core(self) -> object:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def read(self) -> Split:
        cm = self._core().read_namespaced_config_map(self.name, self.namespace)  # type: ignore[attr-defined]
        return Split.from_keys(dict(cm.data or {}))

    def write(self, split: Split) -> None:
        self._core().patch_namespaced_config_map(  # type: ignore[attr-defined]
            self.name, self.namespace, {"data": split.runtime_keys()}
        )
