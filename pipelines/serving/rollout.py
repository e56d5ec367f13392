"""Rollout controller: export + infra validation, staging, canary monitoring, promote/rollback.

Serving state is the ``model_config_list`` file (versions, ``stable``/``canary`` labels) plus the
router's canary weight; the registry's ``champion`` alias moves only at promotion. Labels are
set in two phases (load the version, wait for AVAILABLE, then label). Rollback sets the weight
to 0 before touching any config. Every step is idempotent; its state is persisted in the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.shard import Manifest, load_manifest, read_split
from pipelines.evaluate.run import load_run_model
from pipelines.registry import CHALLENGER, CHAMPION, Registry
from pipelines.serving import model_config
from pipelines.serving.client import ServingClient, serving_url
from pipelines.serving.export import export_saved_model, parity, to_instances
from pipelines.serving.router import RouterClient, WeightStore, weights_file
from pipelines.serving.server import ModelManager, make_server
from pipelines.store import ObjectStore, open_store, storage_options
from pipelines.train.model import predict_proba

log = logging.getLogger(__name__)
SMOKE_REQUESTS = 20


class RolloutError(RuntimeError):
    """A rollout step failed; serving state was restored to what it was before the step."""


def remote_router(settings: Settings) -> RouterClient:
    """The admin API of the router in front of a remote TF Serving (``canary.router_url``)."""
    if not settings.canary.router_url:
        raise RolloutError("serving.mode is 'remote' but canary.router_url is not set.")
    return RouterClient(settings.canary.router_url, settings.canary.admin_token)


def _paths(settings: Settings) -> tuple[Path, Path, WeightStore | RouterClient]:
    """Config file, model directory, and the canary weight: the local router's file, or the
    remote router's admin API."""
    base, name = Path(settings.serving.base_dir), settings.mlflow.model_name
    weights: WeightStore | RouterClient = (
        remote_router(settings)
        if settings.serving.mode == "remote"
        else WeightStore(weights_file(base, name))
    )
    return base / "models.config", base / name, weights


def _set_entry(settings: Settings, entry: model_config.ModelEntry | None) -> None:
    """Write the model's entry of the config (None removes it). With ``serving.publish_root``
    the new state is published there first (version directories, then the config): a remote
    TF Serving reading that base path (through a sync) never sees a config naming a version
    that is not there yet, and the local file only records what was published."""
    config_file, _, _ = _paths(settings)
    name = settings.mlflow.model_name
    entries = [e for e in _read_config(settings) if e.name != name]
    entries += [entry] if entry else []
    if settings.serving.publish_root:
        publish(settings, entries)
    model_config.write(config_file, entries)


def _read_config(settings: Settings) -> list[model_config.ModelEntry]:
    """The serving state: the published config when a remote TF Serving reads it (task pods
    share no disk), else the local file."""
    if settings.serving.publish_root:
        target = _publish_target(settings)
        if not target.exists("models.config"):
            return []
        return model_config.parse(target.read_text("models.config"))
    return model_config.read(_paths(settings)[0])


def current_entry(settings: Settings) -> model_config.ModelEntry | None:
    name = settings.mlflow.model_name
    return next((e for e in _read_config(settings) if e.name == name), None)


def _publish_target(settings: Settings) -> ObjectStore:
    assert settings.serving.publish_root
    return ObjectStore(settings.serving.publish_root, storage_options(settings.store))


PUBLISHED = "_published"  # marker written after a version directory's files


def publish(settings: Settings, entries: list[model_config.ModelEntry]) -> None:
    """Mirror the serving state to ``serving.publish_root`` (any fsspec URI; SSE and
    credentials of ``store``): every listed version not yet there, then ``models.config``
    with ``base_path`` as TF Serving sees it (``serving.model_base_path``)."""
    cfg, name = settings.serving, settings.mlflow.model_name
    target = _publish_target(settings)
    _, model_dir, _ = _paths(settings)
    out = []
    for e in entries:
        if e.name == name:
            for v in e.versions:
                prefix = f"{name}/{v}"
                if not target.exists(f"{prefix}/{PUBLISHED}"):
                    if not (model_dir / str(v) / "saved_model.pb").is_file():
                        raise RolloutError(
                            f"Cannot publish version {v}: {model_dir / str(v)} holds no SavedModel."
                        )
                    target.put_dir(model_dir / str(v), prefix)
                    target.write_text(f"{prefix}/{PUBLISHED}", "")
            e = model_config.ModelEntry(
                e.name, cfg.model_base_path or target.uri(name), e.versions, e.labels
            )
        out.append(e)
    target.write_text("models.config", model_config.render(out))


def canary_state_key(settings: Settings, version: str) -> str:
    """Where the canary analysis of a version keeps its state (see serving.monitor)."""
    return f"{layout.rollout(settings.mlflow.model_name, version)}/canary.json"


def _save_state(store: ObjectStore, settings: Settings, version: str, **fields: Any) -> None:
    key = f"{layout.rollout(settings.mlflow.model_name, version)}/state.json"
    state = json.loads(store.read_text(key)) if store.exists(key) else {}
    state.update(fields, updated=time.time())
    store.write_text(key, json.dumps(state, indent=2, default=str))


def _tree_sha256(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- export and infra validation -------------------------------------------------------------
def _latency_probe(
    url: str, model: str, version: str, instances: list[dict[str, Any]], n: int = 60
) -> tuple[list[float], list[float]]:
    client = ServingClient(url)
    times, preds = [], []
    for i in range(n):
        inst = instances[i % len(instances)]
        t0 = time.perf_counter()
        preds.extend(client.predict(model, [inst], version=version))
        times.append((time.perf_counter() - t0) * 1000)
    return times, preds


def _held_out(settings: Settings, version: str) -> tuple[str, Manifest, pd.DataFrame, Any]:
    """(run id, manifest, test split, torch model) of a registered version: the rows every
    serving check sends are the ones the version was evaluated on."""
    reg, store = Registry(settings.mlflow), open_store(settings.store)
    run_id = reg.version_run_id(version)
    manifest = load_manifest(store, reg.run_tag(run_id, "manifest_uri") or "")
    return run_id, manifest, read_split(store, manifest, "test"), load_run_model(reg, run_id)


def export_and_infra_validate(settings: Settings, version: str) -> dict[str, Any]:
    """SavedModel for a registered version: parity with torch, then load-and-query in a server."""
    reg, store = Registry(settings.mlflow), open_store(settings.store)
    run_id, _, test, model = _held_out(settings, version)
    test = test.head(500)
    name = settings.mlflow.model_name
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        base = Path(tmp) / name
        out = export_saved_model(model, base / str(version), warmup_rows=test)
        par = parity(model, out, test)
        # Load-and-query in a TF-Serving-compatible server, next to the champion if any.
        champion = reg.alias_version(CHAMPION)
        versions = [int(version)]
        if champion and champion != str(version):
            store.get_dir(f"{layout.export(name, champion)}/saved_model", base / champion)
            versions.append(int(champion))
        manager = ModelManager()
        manager.apply([model_config.ModelEntry(name, str(base), versions)])
        server = make_server(manager, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            client = ServingClient(url)
            for v in versions:
                client.wait_available(name, v, timeout=settings.serving.load_timeout_s)
            instances = to_instances(test, model)
            cand_ms, served = _latency_probe(url, name, str(version), instances)
            champ_ms = (
                _latency_probe(url, name, champion, instances)[0]
                if len(versions) > 1 and champion
                else None
            )
        finally:
            server.shutdown()
            server.server_close()
            manager.stop()
        # The server must answer with what the torch model computes for the same rows.
        p_torch = predict_proba(model, test)
        idx = np.arange(len(served)) % len(instances)
        diff = float(np.max(np.abs(np.asarray(served, dtype=float) - p_torch[idx])))
        p99 = float(np.percentile(cand_ms, 99))
        champ_p99 = float(np.percentile(champ_ms, 99)) if champ_ms else None
        budget = settings.serving.latency_budget_ms
        if champ_p99 is not None:
            budget = max(min(budget, settings.serving.latency_budget_ratio * champ_p99), 5.0)
        if p99 > budget:
            raise RolloutError(
                f"Version {version} fails infra validation: p99 {p99:.1f} ms "
                f"over the budget {budget:.1f} ms."
            )
        if diff > 1e-5:
            raise RolloutError(f"Version {version} served predictions differ by {diff:.2e}.")
        files = _tree_sha256(out)
        prefix = f"{layout.export(name, version)}/saved_model"
        store.put_dir(out, prefix)
        store.write_text(
            f"{layout.export(name, version)}/export.json",
            json.dumps({"version": version, "run_id": run_id, "files": files}, indent=2),
        )
    result = {
        "export_uri": store.uri(prefix),
        "parity_max_abs_diff": par["max_abs_diff"],
        "p99_ms": round(p99, 2),
        "champion_p99_ms": champ_p99,
        "latency_budget_ms": round(budget, 2),
    }
    reg.set_version_tags(version, {"export_uri": result["export_uri"], "infra_validated": True})
    _save_state(store, settings, version, phase="exported", **result)
    return result


# -- staging ---------------------------------------------------------------------------------
def _fetch_verified(store: ObjectStore, name: str, version: str, dest: Path) -> None:
    """Download the export and check every file against its recorded sha256."""
    meta = json.loads(store.read_text(f"{layout.export(name, version)}/export.json"))
    store.get_dir(f"{layout.export(name, version)}/saved_model", dest)
    got = _tree_sha256(dest)
    if got != meta["files"]:
        bad = sorted(k for k in set(got) | set(meta["files"]) if got.get(k) != meta["files"].get(k))
        raise RolloutError(f"Export of version {version} fails its sha256 check: {bad[:5]}")


def stage_canary(settings: Settings, version: str) -> dict[str, Any]:
    """Copy the version under the serving base path, load it, and point ``canary`` at it."""
    store, name = open_store(settings.store), settings.mlflow.model_name
    store.delete(canary_state_key(settings, version))  # a new staging starts a new analysis
    _, model_dir, weights = _paths(settings)
    target = model_dir / str(version)
    if not target.exists():
        tmp = model_dir / f"{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _fetch_verified(store, name, version, tmp)
        tmp.rename(target)  # a version directory is complete or absent
    url = serving_url(settings)
    client = ServingClient.from_settings(settings, url)
    before = current_entry(settings)
    stable = before.labels.get("stable") if before else None
    v = int(version)
    try:
        if stable is None or stable == v:
            # First deployment: load alone, then label it both stable and canary.
            _set_entry(settings, model_config.ModelEntry(name, str(model_dir), [v]))
            client.wait_available(name, v, timeout=settings.serving.load_timeout_s)
            labels = {"stable": v, "canary": v}
        else:
            _set_entry(
                settings,
                model_config.ModelEntry(
                    name, str(model_dir), [stable, v], {"stable": stable, "canary": stable}
                ),
            )
            client.wait_available(name, v, timeout=settings.serving.load_timeout_s)
            labels = {"stable": stable, "canary": v}
        weights.set(0)
        _set_entry(
            settings,
            model_config.ModelEntry(name, str(model_dir), sorted({stable or v, v}), labels),
        )
        _wait_label(client, name, "canary", v, settings.serving.load_timeout_s)
        instances = _smoke_instances(settings, version)
        for i in range(SMOKE_REQUESTS):
            client.predict(name, [instances[i % len(instances)]], label="canary")
    except Exception as exc:
        _set_entry(settings, before)
        raise RolloutError(f"Staging version {version} failed and was undone: {exc}") from exc
    result = {
        "stable": stable,
        "canary": v,
        "first_deployment": stable is None or stable == v,
        "serving_url": url,
    }
    _save_state(store, settings, version, phase="staged", **result)
    return result


def _wait_label(client: ServingClient, name: str, label: str, version: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.label_version(name, label) == version:
            return
        time.sleep(0.2)
    raise RolloutError(f"Label {label} of {name} never pointed at version {version}.")


def _smoke_instances(settings: Settings, version: str) -> list[dict[str, Any]]:
    _, _, test, model = _held_out(settings, version)
    return to_instances(test, model)


# -- promote / rollback ----------------------------------------------------------------------
def promote(settings: Settings, version: str) -> dict[str, Any]:
    """Canary becomes stable: weight 100, labels, weight 0, then the ``champion`` alias."""
    store, name = open_store(settings.store), settings.mlflow.model_name
    _, model_dir, weights = _paths(settings)
    entry = current_entry(settings)
    v = int(version)
    if entry is None or v not in entry.versions:
        raise RolloutError(f"Version {version} is not loaded; nothing to promote.")
    old = entry.labels.get("stable")
    weights.set(100)
    # Keep the old stable loaded (unlabelled) for a fast manual rollback until the next rollout.
    _set_entry(
        settings,
        model_config.ModelEntry(
            name, str(model_dir), sorted({v, *([old] if old else [])}), {"stable": v, "canary": v}
        ),
    )
    _wait_label(
        ServingClient.from_settings(settings, serving_url(settings)),
        name,
        "stable",
        v,
        settings.serving.load_timeout_s,
    )
    weights.set(0)
    reg = Registry(settings.mlflow)
    reg.set_alias(CHAMPION, version)
    if reg.alias_version(CHALLENGER) == str(version):
        reg.delete_alias(CHALLENGER)
    reg.set_version_tags(version, {"rollout": "promoted", "promoted_at": int(time.time())})
    result = {"decision": "promoted", "stable": v, "previous_stable": old, "aliases": reg.aliases()}
    _save_state(store, settings, version, phase="promoted", **result)
    return result


def rollback(settings: Settings, version: str, reason: str = "") -> dict[str, Any]:
    """Weight 0 first, then labels back to stable, then unload the canary version."""
    store, name = open_store(settings.store), settings.mlflow.model_name
    _, model_dir, weights = _paths(settings)
    try:
        weights.set(0)
    except requests.RequestException as exc:  # labels below send "canary" traffic to stable
        log.warning("could not zero the canary weight (router down?): %s", exc)
    entry = current_entry(settings)
    v = int(version)
    stable = entry.labels.get("stable") if entry else None
    if stable is not None and stable != v:
        _set_entry(
            settings,
            model_config.ModelEntry(
                name, str(model_dir), [stable], {"stable": stable, "canary": stable}
            ),
        )
    elif entry is not None:  # a failed first deployment: nothing was serving before
        _set_entry(settings, None)
    reg = Registry(settings.mlflow)
    if reg.alias_version(CHALLENGER) == str(version):
        reg.delete_alias(CHALLENGER)
    reg.set_version_tags(version, {"rollout": "rolled_back", "rollback_reason": reason[:4000]})
    result = {
        "decision": "rolled_back",
        "stable": stable,
        "reason": reason,
        "aliases": reg.aliases(),
    }
    _save_state(store, settings, version, phase="rolled_back", **result)
    return result


def serving_labels(settings: Settings) -> dict[str, Any]:
    _, _, weights = _paths(settings)
    entry = current_entry(settings)
    return {
        "versions": entry.versions if entry else [],
        "labels": entry.labels if entry else {},
        "canary_weight": weights.get(),
    }
