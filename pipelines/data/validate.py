"""The data gate's stage, and all of its I/O: a landing partition read batch by batch through the
spec's checks, the report written to ``<partition>/_validation/``. A failed ``block`` check moves
the batch to ``quarantine/``; a failed ``warn`` check is reported and lets it through."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data import layout
from pipelines.data.batches import (
    DEFAULT_BATCH_ROWS,
    PartitionUnreadable,
    iter_partition,
    prefetch,
    stable_hash,
)
from pipelines.data.expectations import SuiteRunner, data_docs
from pipelines.data.interval import IntervalCheck
from pipelines.data.merge import PARTIAL, PartitionResults, check_result, clean, verdict
from pipelines.data.profile import PartitionStats
from pipelines.data.results import CheckResult, ValidationBlocked, ValidationSummary
from pipelines.data.spec import DatasetSpec
from pipelines.store import ObjectStore

log = logging.getLogger(__name__)


def latest_reference(store: ObjectStore, dataset: str, before: str) -> dict[str, Any] | None:
    """Profile of the last batch accepted strictly before ``before`` (backfill-safe)."""
    cutoff = layout.partition(before)
    parts = [k.rsplit("/", 1)[-1] for k in store.list(layout.reference(dataset))]
    older = sorted(p for p in parts if p.startswith("dt=") and p < cutoff)
    if not older:
        return None
    return json.loads(store.read_text(f"{layout.reference(dataset)}/{older[-1]}/profile.json"))


def _keys_with_hashes(
    store: ObjectStore, prefix: str, key: str, hashes: np.ndarray, limit: int = PARTIAL
) -> list[Any]:
    """A second pass over the key column only, for example values of cross-batch duplicates."""
    found: list[Any] = []
    for table in iter_partition(store, prefix, columns=[key]):
        values = table.column(key)
        hit = np.isin(stable_hash(values), hashes)
        found += [clean(v) for v in values.filter(pa.array(hit)).to_pylist()]
        if len(found) >= limit:
            break
    return found[:limit]


def validate_partition(
    store: ObjectStore,
    spec: DatasetSpec,
    date: str,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    late_tolerance_s: float = 0.0,
) -> ValidationSummary:
    """Validate ``landing/<dataset>/dt=<date>``; quarantine it and raise if a check blocks.

    Besides the spec's checks, the partition must hold what its layout claims: every
    ``event_time`` in ``[date, date+1)``, or at most ``late_tolerance_s`` before it. The
    partition is read ``batch_rows`` rows at a time (the next one prefetched on a thread),
    so memory does not grow with it."""
    prefix = layout.landing(spec.name, date)
    if not store.exists(prefix):
        moved = store.list(layout.quarantine(spec.name, date))
        hint = f" It was quarantined earlier: {store.uri(moved[0])}." if moved else ""
        raise FileNotFoundError(f"No landing partition at {store.uri(prefix)}.{hint}")
    runner = SuiteRunner(spec)
    results = PartitionResults(spec.key)
    stats = PartitionStats(spec, latest_reference(store, spec.name, date))
    interval = IntervalCheck(spec.event_time, date, late_tolerance_s) if spec.event_time else None
    checks: list[CheckResult] = []
    html = ""
    drift: dict[str, dict[str, float]] = {}
    last: Any = None  # GE's suite result object of the last batch, the Data Docs page's frame
    try:
        for table in prefetch(iter_partition(store, prefix, batch_rows)):
            dicts, last = runner.validate_frame(table.to_pandas())
            results.add(dicts, table)
            stats.add(table)
            if interval is not None:
                interval.add(table)
        if results.batches == 0:  # no files at all: the schema and row checks still run
            empty = pa.table({})
            dicts, last = runner.validate_frame(empty.to_pandas())
            results.add(dicts, empty)
    except PartitionUnreadable as exc:
        checks.append(CheckResult("readable_parquet", None, "block", False, str(exc)))
    else:
        dup_hashes = results.duplicate_key_hashes()
        examples = _keys_with_hashes(store, prefix, spec.key, dup_hashes) if len(dup_hashes) else []
        finished = results.finish(examples)
        checks = [check_result(d, spec.pii_columns) for d in finished]
        html = data_docs(last, finished)
        checks += [interval.result()] if interval is not None else []
        checks += stats.leakage_checks()
        drift_results, drift = stats.drift_checks()
        checks += drift_results
    status = verdict(checks)
    blocked = status == "blocked"
    summary = ValidationSummary(spec.name, date[:10], results.rows, status, checks, drift)
    summary.batches = results.batches
    report_prefix = layout.validation_report(spec.name, date)
    summary.report_uri = store.uri(f"{report_prefix}/summary.json")
    if html:
        store.write_text(f"{report_prefix}/data_docs.html", html)
    if blocked:
        dest = f"{layout.quarantine(spec.name, date)}/{uuid.uuid4().hex[:12]}"
        summary.quarantine_uri = store.uri(dest)
        summary.report_uri = store.uri(f"{dest}/_validation/summary.json")
        store.write_text(f"{report_prefix}/summary.json", json.dumps(summary.to_dict(), indent=2))
        store.move(prefix, dest)
        # Not logged here: the caller shows the report once (the CLI prints it, the DAG task
        # logs it under its header).
        raise ValidationBlocked(summary)
    store.write_text(f"{report_prefix}/summary.json", json.dumps(summary.to_dict(), indent=2))
    store.write_text(
        f"{layout.reference(spec.name, date)}/profile.json", json.dumps(stats.profile())
    )
    log.info("%s", summary.message())
    return summary
