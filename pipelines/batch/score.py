"""Batch scoring with the exact serving artifact: plan a day's chunks, score one chunk, publish.

Each step is one function a DAG task (or a pod, or ``mlops score``) calls:

- :func:`plan_scoring` resolves the version (the ``champion`` unless pinned) and its runtime,
  fingerprints the landing files and cuts them into chunks of whole row groups; when that day's
  scores by that version are already published it says so and plans nothing.
- :func:`score_chunk` scores one chunk with the runtime (SavedModel, or the ONNX variant the
  optimisation gate chose) and writes its part atomically. A retry rewrites the same bytes.
- :func:`publish` checks every part and that the inputs did not change, then publishes the
  manifest last and only once (``create_bytes``): published scores never change.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.batch.plan import (
    MANIFEST,
    Chunk,
    InputFile,
    PlanError,
    ScoringJob,
    manifest,
    manifest_bytes,
    plan_chunks,
)
from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.batches import PartitionUnreadable, partition_files
from pipelines.evaluate.threshold import version_threshold
from pipelines.store import ObjectStore, StoreError, open_store

if TYPE_CHECKING:
    from pipelines.registry import Registry

log = logging.getLogger(__name__)

RUNTIMES = ("savedmodel", "onnx")


class ScoringError(RuntimeError):
    """A scoring run cannot go on: no champion, no input, a conflicting published manifest."""


class ScoringInputError(ScoringError, ValueError):
    """What was asked for does not exist (an unknown version): the CLI's exit 2."""


# -- plan ------------------------------------------------------------------------------------
def resolve_version(settings: Settings, version: str | None, reg: Registry | None = None) -> str:
    """The pinned version, or the ``champion`` alias's; a clear error when there is none."""
    from pipelines.registry import Registry

    reg = reg or Registry(settings.mlflow)
    if version:
        try:
            reg.version(version)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
            raise ScoringInputError(
                f"Model {settings.mlflow.model_name} has no version {version!r}: {exc}"
            ) from None
        return str(version)
    champion = reg.alias_version("champion")
    if champion is None:
        raise ScoringError(
            f"Model {settings.mlflow.model_name} has no champion yet; promote a version first "
            "or pin one (--version / the version param)."
        )
    return champion


def choose_runtime(
    settings: Settings, version: str, reg: Registry | None = None
) -> tuple[str, str]:
    """(runtime, variant): ``batch.runtime`` when set (fp32), else the version's
    ``batch_runtime`` and ``batch_variant`` tags (the optimisation gate's choice), else the
    SavedModel."""
    from pipelines.registry import TAG_PREFIX, Registry

    if settings.batch.runtime != "auto":
        return settings.batch.runtime, "fp32"
    tags = (reg or Registry(settings.mlflow)).version(version).tags or {}
    runtime = tags.get(f"{TAG_PREFIX}batch_runtime", "savedmodel")
    if runtime == "onnxruntime":
        runtime = "onnx"
    if runtime not in RUNTIMES:
        raise ScoringError(f"Version {version} names an unknown batch runtime {runtime!r}.")
    return runtime, tags.get(f"{TAG_PREFIX}batch_variant", "fp32")


def input_files(store: ObjectStore, prefix: str) -> list[InputFile]:
    """The partition's parquet files with their row groups (footers only) and sha256."""
    out = []
    for key in partition_files(store, prefix):
        try:
            with store.open(key) as fh:
                meta = pq.ParquetFile(fh).metadata
                groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise PartitionUnreadable(f"{store.uri(key)} is not readable parquet: {exc}") from exc
        out.append(InputFile(key, store.sha256(key), groups))
    return out


def plan_scoring(
    settings: Settings, date: str, version: str | None = None, dataset: str | None = None
) -> dict[str, Any]:
    """The day's chunk jobs, or (``published``) the manifest already published for them."""
    from pipelines.data.spec import load_spec
    from pipelines.registry import Registry

    spec = load_spec(dataset or settings.data.dataset, settings.data.spec_dir)
    reg = Registry(settings.mlflow)  # one client: opening MLflow's store costs ~1 s
    version = resolve_version(settings, version, reg)
    store = open_store(settings.store)
    model = settings.mlflow.model_name
    prefix = layout.predictions(spec.name, model, version, date)
    landing = layout.landing(spec.name, date)
    files = input_files(store, landing)
    published = _published(store, prefix)
    if published is not None:
        if [(f.key, f.sha256) for f in files] != [
            (i["key"], i["sha256"]) for i in published["inputs"]
        ]:
            raise ScoringError(
                f"{store.uri(landing)} changed after version {version}'s scores of it were "
                f"published ({published['manifest_uri']}); published scores never change. "
                "Score it with another version, or delete that prefix on purpose."
            )
        log.info("scores of %s on %s by version %s already published", spec.name, date, version)
        return {"published": published, "jobs": [], "prefix": prefix, "inputs": []}
    if not files:
        raise ScoringError(
            f"No landing data for {spec.name} on {date} at {store.uri(landing)} (not generated, "
            "or quarantined by the data gate)."
        )
    runtime, variant = choose_runtime(settings, version, reg)
    threshold = version_threshold(reg, version, settings.evaluate.threshold)
    try:
        chunks = plan_chunks(files, settings.batch.chunk_rows)
    except PlanError as exc:
        raise ScoringError(f"{spec.name} on {date}: {exc}") from None
    jobs = [
        ScoringJob(
            dataset=spec.name,
            date=str(date)[:10],
            model=model,
            version=version,
            runtime=runtime,
            variant=variant,
            threshold=threshold,
            key_column=spec.key,
            features=tuple(spec.features),
            output_prefix=prefix,
            chunk=c,
        )
        for c in chunks
    ]
    return {
        "published": None,
        "jobs": [json.loads(j.to_json()) for j in jobs],
        "inputs": [
            {"key": f.key, "sha256": f.sha256, "row_groups": list(f.row_groups)} for f in files
        ],
        "prefix": prefix,
    }


def latest_landing_date(settings: Settings, dataset: str | None = None) -> str:
    """The newest ``dt=`` partition under ``landing/<dataset>/`` that holds parquet files."""
    from pipelines.data.spec import load_spec

    spec = load_spec(dataset or settings.data.dataset, settings.data.spec_dir)
    store = open_store(settings.store)
    root = layout.landing(spec.name, "2000-01-01").rsplit("/", 1)[0]
    dates = sorted(
        {
            k[len(root) + 4 : len(root) + 14]
            for k in store.list(root, recursive=True)
            if k.startswith(f"{root}/dt=") and k.endswith(".parquet") and "/_" not in k
        },
    )
    if not dates:
        raise ScoringError(f"No landing partition under {store.uri(root)} to score.")
    return dates[-1]


def _published(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    key = f"{prefix}/{MANIFEST}"
    if not store.exists(key):
        return None
    return dict(json.loads(store.read_text(key)), manifest_uri=store.uri(key))


# -- score -----------------------------------------------------------------------------------
_RUNTIMES: dict[tuple[str, str, str, int | None], Any] = {}


def fetch_artifact(
    store: ObjectStore, model: str, version: str, runtime: str, variant: str
) -> Path:
    """The version's artifact for the job's runtime in a process-lifetime temporary directory,
    every file checked against the sha256 recorded when it was exported."""
    tmp = Path(tempfile.mkdtemp(prefix="mlops-score-"))
    atexit.register(shutil.rmtree, tmp, True)
    if runtime == "savedmodel":
        from pipelines.serving.rollout import fetch_verified_export

        dest = tmp / version
        fetch_verified_export(store, model, version, dest)
        return dest
    meta_key = f"{layout.export(model, version)}/optimization.json"
    if not store.exists(meta_key):
        raise ScoringError(
            f"Version {version} has no ONNX artifacts ({store.uri(meta_key)} is missing); "
            "run its optimisation step or score with batch.runtime=savedmodel."
        )
    meta = json.loads(store.read_text(meta_key))
    art = (meta.get("artifacts") or {}).get(variant)
    if not art:
        raise ScoringError(f"Version {version} has no ONNX {variant} artifact.")
    data = store.read_bytes(f"{layout.export(model, version)}/{art['path']}")
    if hashlib.sha256(data).hexdigest() != art["sha256"]:
        raise ScoringError(f"ONNX {variant} artifact of {version} fails its sha256 check.")
    dest = tmp / Path(art["path"]).name
    dest.write_bytes(data)
    return dest


def runtime_for(store: ObjectStore, job: ScoringJob, threads: int | None = None) -> Any:
    """The job's runtime, loaded once per process (a worker scores many chunks with it)."""
    from pipelines.optimize.runtimes import load_runtime

    key = (job.version, job.runtime, job.variant, threads)
    if key not in _RUNTIMES:
        path = fetch_artifact(store, job.model, job.version, job.runtime, job.variant)
        _RUNTIMES[key] = load_runtime(job.runtime, path, threads=threads, variant=job.variant)
    return _RUNTIMES[key]


def read_chunk(store: ObjectStore, job: ScoringJob) -> pa.Table:
    c: Chunk = job.chunk
    columns = [job.key_column, *job.features]
    try:
        with store.open(c.source) as fh:
            table = pq.ParquetFile(fh).read_row_groups(
                list(range(c.first_group, c.stop_group)), columns=columns
            )
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PartitionUnreadable(f"{store.uri(c.source)} is not readable parquet: {exc}") from exc
    if table.num_rows != c.rows:
        raise ScoringError(
            f"{store.uri(c.source)} row groups {c.first_group}-{c.stop_group} hold "
            f"{table.num_rows} rows, the plan said {c.rows}: the input changed after planning."
        )
    return table


def part_bytes(keys: pa.Array | pa.ChunkedArray, scores: np.ndarray, job: ScoringJob) -> bytes:
    """One part's parquet bytes: key, score, decision, model version. Built from arrays (no
    pandas metadata, no clock), so the same rows and model give the same bytes."""
    scores = np.asarray(scores, dtype=np.float64)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    table = pa.table(
        {
            "key": keys.cast(pa.string()),
            "score": pa.array(scores, pa.float64()),
            "decision": pa.array(scores >= job.threshold, pa.bool_()),
            "model_version": pa.repeat(pa.scalar(job.version, pa.string()), len(scores)),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def score_chunk(settings: Settings, job: ScoringJob, threads: int | None = None) -> dict[str, Any]:
    """Score one chunk and write its part (atomically, under its fixed name); returns its
    index, rows and sha256 for :func:`publish`."""
    store = open_store(settings.store)
    runtime = runtime_for(store, job, threads)
    table = read_chunk(store, job)
    frame = table.select(list(job.features)).to_pandas()
    scores = runtime.predict(frame)
    if len(scores) != table.num_rows or not np.all(np.isfinite(scores)):
        raise ScoringError(
            f"Chunk {job.chunk.index}: the {job.runtime} runtime returned {len(scores)} scores "
            f"for {table.num_rows} rows, or non-finite ones."
        )
    data = part_bytes(table.column(job.key_column), scores, job)
    key = f"{job.output_prefix}/{job.chunk.part}"
    store.write_bytes(key, data)
    digest = hashlib.sha256(data).hexdigest()
    log.info("chunk %d: %d rows scored -> %s", job.chunk.index, table.num_rows, store.uri(key))
    return {"index": job.chunk.index, "rows": table.num_rows, "sha256": digest, "path": key}


# -- publish ---------------------------------------------------------------------------------
def publish(
    settings: Settings, plan: dict[str, Any], parts: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Check every planned part and the inputs, then publish the manifest (once). The parts
    are read back from the store (a pod's result need not travel through XCom); ``parts``
    from the tasks, when given, must match them. An equal manifest already there is this run's
    own (a retried publish); a different one is an error."""
    store = open_store(settings.store)
    if plan.get("published"):
        return _summary(plan["published"], published_now=False)
    jobs = [ScoringJob.from_dict(j) for j in plan["jobs"]]
    found = [_part_info(store, j) for j in jobs]
    told = {int(p["index"]): p["sha256"] for p in parts or []}
    changed = [p["index"] for p in found if p["index"] in told and told[p["index"]] != p["sha256"]]
    if changed:
        raise ScoringError(f"Parts of chunks {changed} changed after they were scored.")
    inputs = [InputFile(f["key"], f["sha256"], tuple(f["row_groups"])) for f in plan["inputs"]]
    for f in inputs:
        if store.sha256(f.key) != f.sha256:
            raise ScoringError(
                f"{store.uri(f.key)} changed while it was scored; nothing was published. "
                "Rerun the scoring."
            )
    try:
        data = manifest(jobs, inputs, found)
    except PlanError as exc:
        raise ScoringError(str(exc)) from None
    body = manifest_bytes(data)
    key = f"{plan['prefix']}/{MANIFEST}"
    if not store.create_bytes(key, body):
        existing = store.read_bytes(key)
        if existing != body:
            raise ScoringError(
                f"Scores of {data['dataset']} on {data['date']} by version {data['version']} "
                f"are already published with different content ({store.uri(key)}); published "
                "scores never change. Pin another version, or delete that prefix on purpose."
            )
    return _summary(dict(data, manifest_uri=store.uri(key)), published_now=True)


def _part_info(store: ObjectStore, job: ScoringJob) -> dict[str, Any]:
    key = f"{job.output_prefix}/{job.chunk.part}"
    try:
        with store.open(key) as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        digest = store.sha256(key)
    except (OSError, StoreError, pa.ArrowException) as exc:
        raise ScoringError(
            f"Chunk {job.chunk.index} has no part at {store.uri(key)} ({exc}); its task must "
            "succeed first."
        ) from None
    return {"index": job.chunk.index, "rows": rows, "sha256": digest}


def _summary(m: dict[str, Any], published_now: bool) -> dict[str, Any]:
    return {
        "manifest_uri": m["manifest_uri"],
        "dataset": m["dataset"],
        "date": m["date"],
        "version": m["version"],
        "runtime": m["runtime"],
        "variant": m["variant"],
        "rows": m["rows"],
        "parts": len(m["parts"]),
        "published_now": published_now,
    }
