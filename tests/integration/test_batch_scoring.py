"""Batch scoring on real components: a trained, registered and exported champion, the lake on
local files, the SavedModel runtime, and the project's TF-Serving-compatible server."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from pipelines import stages
from pipelines.batch.score import ScoringError, ScoringInputError, plan_scoring, publish
from pipelines.config import Settings
from pipelines.data import layout
from pipelines.registry import Registry
from pipelines.store import open_store
from tests.model_helpers import exported_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAY = "2026-11-01"
GROUP_ROWS = 1500  # the landing file is rewritten with 4 row groups: 4 chunks at 1,500 rows


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str]]:
    """A small model trained (one node, 2 epochs), registered, exported and made champion."""
    home = tmp_path_factory.mktemp("scoring") / "mlops"
    batch = {"chunk_rows": GROUP_ROWS, "runtime": "savedmodel"}
    with exported_version(home, DAY, batch=batch) as (s, version):
        Registry(s.mlflow).set_alias("champion", version)
        # Several row groups, so the day is several chunks (the generator writes one per 128Ki).
        store = open_store(s.store)
        key = f"{layout.landing('transactions', DAY)}/part-00000.parquet"
        table = pq.read_table(io.BytesIO(store.read_bytes(key)))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=GROUP_ROWS)
        store.write_bytes(key, buf.getvalue())
        yield s, version


def _parts(s: Settings, version: str) -> dict[str, bytes]:
    store = open_store(s.store)
    prefix = layout.predictions("transactions", s.mlflow.model_name, version, DAY)
    return {k.rsplit("/", 1)[-1]: store.read_bytes(k) for k in store.list(prefix)}


def _unpublished(s: Settings, version: str) -> tuple[Any, str]:
    """The store and the day's predictions prefix, emptied (each test scores from nothing)."""
    store = open_store(s.store)
    prefix = layout.predictions("transactions", s.mlflow.model_name, version, DAY)
    store.delete(prefix, True)
    return store, prefix


def _served(s: Settings, version: str, rows: list[dict[str, Any]]) -> np.ndarray:
    """The same rows through the project's TF-Serving REST server on the exported version."""
    import tempfile

    from pipelines.serving import model_config
    from pipelines.serving.rollout import fetch_verified_export
    from pipelines.serving.server import ModelManager, make_server

    name = s.mlflow.model_name
    with tempfile.TemporaryDirectory() as tmp:
        fetch_verified_export(open_store(s.store), name, version, Path(tmp) / name / version)
        manager = ModelManager()
        manager.apply([model_config.ModelEntry(name, str(Path(tmp) / name), [int(version)])])
        server = make_server(manager, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/{name}"
            from pipelines.serving.client import ServingClient

            ServingClient(f"http://127.0.0.1:{server.server_address[1]}").wait_available(
                name, int(version), timeout=60
            )
            r = requests.post(f"{url}/versions/{version}:predict", json={"instances": rows})
            r.raise_for_status()
            return np.asarray(r.json()["predictions"], dtype=np.float64)
        finally:
            server.shutdown()
            server.server_close()
            manager.stop()


def test_scores_are_the_server_s_and_a_rerun_publishes_nothing_new(
    champion: tuple[Settings, str],
) -> None:
    s, version = champion
    out = stages.score(s, DAY, workers=1)
    assert out["published_now"] and out["rows"] == 6000 and out["parts"] == 4
    assert (out["version"], out["runtime"], out["variant"]) == (version, "savedmodel", "fp32")
    store = open_store(s.store)
    manifest_key = store.key_of(out["manifest_uri"])
    first = store.read_bytes(manifest_key)
    parts = _parts(s, version)
    assert sorted(parts) == ["manifest.json", *[f"part-0000{i}.parquet" for i in range(4)]]

    # The server answers the same scores for the same raw rows (the exact serving artifact).
    spec_features = plan_scoring(s, DAY, version)["published"]  # published: nothing planned
    assert spec_features is not None
    landing = pq.read_table(
        io.BytesIO(store.read_bytes(f"{layout.landing('transactions', DAY)}/part-00000.parquet"))
    ).to_pandas()
    scored = pq.read_table(io.BytesIO(parts["part-00001.parquet"])).to_pandas()
    rows = landing.iloc[GROUP_ROWS : GROUP_ROWS + 300]  # chunk 1 = row group 1
    assert scored["key"].head(300).tolist() == rows["transaction_id"].astype(str).tolist()
    from pipelines.data.spec import load_spec

    spec = load_spec("transactions")
    instances = [
        {k: (str(v) if k in spec.categorical_features else float(v)) for k, v in rec.items()}
        for rec in rows[spec.features].to_dict("records")
    ]
    served = _served(s, version, instances)
    assert np.max(np.abs(served - scored["score"].head(300).to_numpy())) <= 1e-6
    # Decisions at the version's own operating threshold, as its evaluation recorded it.
    from pipelines.evaluate.threshold import recorded
    from pipelines.registry import Registry

    reg = Registry(s.mlflow)
    threshold = recorded(reg.get_run(reg.version_run_id(version)).data.tags)
    assert threshold is not None and 0 < threshold < s.evaluate.threshold
    assert json.loads(store.read_text(manifest_key))["threshold"] == threshold
    assert (scored["decision"] == (scored["score"] >= threshold)).all()
    assert 0 < scored["decision"].mean() < 0.1  # it flags something, not everything

    # A rerun (a retried DAG run, a second `mlops score`) publishes nothing and changes nothing.
    again = stages.score(s, DAY, workers=1)
    assert again["published_now"] is False and again["manifest_uri"] == out["manifest_uri"]
    assert store.read_bytes(manifest_key) == first and _parts(s, version) == parts


def test_two_workers_write_the_same_bytes_as_one(champion: tuple[Settings, str]) -> None:
    s, version = champion
    before = _parts(s, version) or None
    if before is None:
        stages.score(s, DAY, workers=1)
        before = _parts(s, version)
    store = open_store(s.store)
    store.delete(layout.predictions("transactions", s.mlflow.model_name, version, DAY), True)
    out = stages.score(s, DAY, workers=2)
    assert out["published_now"] and out["workers"] == 2
    assert _parts(s, version) == before  # every part and the manifest, byte for byte


def test_a_failed_chunk_is_retried_alone_and_nothing_is_published_before(
    champion: tuple[Settings, str],
) -> None:
    s, version = champion
    store, prefix = _unpublished(s, version)
    plan = stages.plan_scoring(s, DAY, version)
    assert [j["chunk"]["index"] for j in plan["jobs"]] == [0, 1, 2, 3]
    # Chunk 2's part cannot be written (a directory holds its name): that task fails.
    blocker = Path(store.root_path) / prefix / "part-00002.parquet"
    blocker.mkdir(parents=True)
    results: dict[int, dict[str, Any]] = {}
    for job in plan["jobs"]:
        try:
            results[job["chunk"]["index"]] = stages.score_chunk(s, job)
        except OSError:
            pass
    assert sorted(results) == [0, 1, 3]
    with pytest.raises(ScoringError, match="Chunk 2 has no part"):
        stages.publish_predictions(s, plan, list(results.values()))
    assert not store.exists(f"{prefix}/manifest.json")  # nothing is published half-done
    stamps = {i: os.stat(blocker.parent / f"part-0000{i}.parquet").st_mtime_ns for i in (0, 1, 3)}
    # The retry: chunk 2 alone; the others are not scored again.
    blocker.rmdir()
    results[2] = stages.score_chunk(s, plan["jobs"][2])
    out = stages.publish_predictions(s, plan, list(results.values()))
    assert out["published_now"] and out["rows"] == 6000
    assert stamps == {
        i: os.stat(blocker.parent / f"part-0000{i}.parquet").st_mtime_ns for i in (0, 1, 3)
    }


def test_changed_input_or_conflicting_content_is_never_published(
    champion: tuple[Settings, str],
) -> None:
    s, version = champion
    store, prefix = _unpublished(s, version)
    plan = stages.plan_scoring(s, DAY, version)
    parts = [stages.score_chunk(s, j) for j in plan["jobs"]]
    doctored = dict(plan, inputs=[dict(f, sha256="0" * 64) for f in plan["inputs"]])
    with pytest.raises(ScoringError, match="changed while it was scored"):
        publish(s, doctored, parts)
    # Someone else's manifest under this version and day: published content never changes.
    store.write_text(f"{prefix}/manifest.json", "{}")
    with pytest.raises(ScoringError, match="already published with different content"):
        publish(s, plan, parts)
    assert store.read_text(f"{prefix}/manifest.json") == "{}"
    store.delete(prefix, True)
    # A landing day rewritten after its scores were published: refused, not silently stale.
    stages.score(s, DAY, version)
    key = f"{layout.landing('transactions', DAY)}/part-00000.parquet"
    original = store.read_bytes(key)
    table = pq.read_table(io.BytesIO(original))
    buf = io.BytesIO()
    pq.write_table(table.slice(0, 5999), buf, compression="zstd", row_group_size=GROUP_ROWS)
    store.write_bytes(key, buf.getvalue())
    try:
        with pytest.raises(ScoringError, match=r"changed after version .* were published"):
            stages.plan_scoring(s, DAY, version)
    finally:
        store.write_bytes(key, original)
    assert stages.plan_scoring(s, DAY, version)["published"] is not None


def test_an_unknown_version_or_a_missing_day_says_so(champion: tuple[Settings, str]) -> None:
    s, _ = champion
    with pytest.raises(ScoringInputError, match="has no version '99'"):
        stages.plan_scoring(s, DAY, "99")
    with pytest.raises(ScoringError, match="No landing data for transactions on 2026-12-24"):
        stages.plan_scoring(s, "2026-12-24")


def test_a_worker_s_failure_fails_the_run_and_leaves_no_worker(
    champion: tuple[Settings, str],
) -> None:
    import multiprocessing

    import psutil

    s, version = champion
    store, prefix = _unpublished(s, version)
    blocker = Path(store.root_path) / prefix / "part-00001.parquet"
    blocker.mkdir(parents=True)
    try:
        with pytest.raises(OSError):
            stages.score(s, DAY, workers=2)
    finally:
        blocker.rmdir()
    assert not store.exists(f"{prefix}/manifest.json")
    assert multiprocessing.active_children() == []
    # No spawned worker is left (the session's own servers and multiprocessing's resource
    # tracker, which lives as long as this process, are not workers).
    workers = [
        p.cmdline()
        for p in psutil.Process().children(recursive=True)
        if p.is_running()
        and p.status() != psutil.STATUS_ZOMBIE
        and "spawn_main" in " ".join(p.cmdline())
    ]
    assert workers == [], workers
