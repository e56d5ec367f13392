"""An hour of the serving log, streamed one Arrow table at a time: traffic, errors and latency per
model version against the SLOs, and feature and prediction drift of the judged traffic against
the champion's references. Memory is flat in the hour's row count; nothing loops over rows."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import MonitoringSettings
from pipelines.data.batches import DEFAULT_BATCH_ROWS, BottomK, PartitionUnreadable
from pipelines.data.drift import bin_counts, numeric_drift, quantile_edges
from pipelines.data.profile import PROFILE_SAMPLE, SAMPLE, PartitionStats
from pipelines.data.spec import DatasetSpec
from pipelines.monitoring.schema import missing_columns, schema
from pipelines.store import ObjectStore

UNKNOWN = "unknown"  # the version of rows whose version is null
JUDGED_LABELS = ("stable",)  # drift judges the champion's routed traffic, not the canary's
SERVED_LABELS = ("stable", "baseline")  # a version's SLO: its answers on these routes
TRAFFIC_COLUMNS = ["instance", "label", "version", "status", "latency_ms", "score"]

# Latency histogram (HdrHistogram-like): bins whose bounds grow by LATENCY_GROWTH from
# LATENCY_MIN_MS, plus an underflow and an overflow bin. A quantile is reported at its bin's
# geometric midpoint, at most sqrt(LATENCY_GROWTH) - 1 = 1.0% from any value in the bin.
LATENCY_MIN_MS = 0.01
LATENCY_MAX_MS = 1_000_000.0  # ~17 minutes; beyond it a latency reads as LATENCY_MAX_MS
LATENCY_GROWTH = 1.0201
_LOG_BINS = math.ceil(math.log(LATENCY_MAX_MS / LATENCY_MIN_MS) / math.log(LATENCY_GROWTH))
LATENCY_BINS = _LOG_BINS + 2
_BIN_VALUE = np.concatenate(
    [
        [LATENCY_MIN_MS],
        LATENCY_MIN_MS * LATENCY_GROWTH ** (np.arange(_LOG_BINS) + 0.5),
        [LATENCY_MAX_MS],
    ]
)
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


class ServingLogError(ValueError):
    """A serving-log file lacks a column of the log's schema, or holds one of another type."""


def latency_bins(latency_ms: np.ndarray) -> np.ndarray:
    """The histogram bin of each latency: 0 below LATENCY_MIN_MS (and NaN), the last bin at or
    beyond LATENCY_MAX_MS."""
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.log(np.asarray(latency_ms, dtype=float) * (1 / LATENCY_MIN_MS))
    f *= 1 / math.log(LATENCY_GROWTH)
    # fmax/fmin drop NaN for the other operand: NaN and -inf land in the underflow bin
    return (np.fmin(np.fmax(f, -1.0), _LOG_BINS) + 1.0).astype(np.intp)


def latency_quantiles(hist: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99 (ms) of a latency histogram, within ~1% of the exact order statistics."""
    n = int(hist.sum())
    if not n:
        return dict.fromkeys(QUANTILES)
    cum = np.cumsum(hist)
    ranks = np.array(list(QUANTILES.values())) * (n - 1)
    values = _BIN_VALUE[np.searchsorted(cum, ranks, side="right")]
    return {k: round(float(v), 3) for k, v in zip(QUANTILES, values, strict=True)}


def score_reference(scores: np.ndarray) -> dict[str, list[float]]:
    """The prediction-drift reference of the champion's evaluation-time scores: quantile bin
    edges and a sorted sample of at most 2,000 scores (as the reference profile stores one)."""
    x = np.sort(np.asarray(scores, dtype=float))
    x = x[~np.isnan(x)]
    pick = np.linspace(0, len(x) - 1, min(PROFILE_SAMPLE, len(x))).astype(int)
    return {"edges": list(map(float, quantile_edges(x))), "sample": list(map(float, x[pick]))}


@dataclass(eq=False)
class Traffic:
    """Exact counts and the latency histogram of one (version, label) or an aggregate of them.

    A request logs one row per instance, all with the request's status and latency: its
    ``instance == 0`` row stands for the request (distinct request ids are not streamable
    cheaply), so error rate and latency (errors' included) are per answer, not weighted by the
    request's batch size."""

    instances: int = 0
    requests: int = 0
    errors: int = 0  # requests answered 5xx or not at all (a 4xx is the client's mistake)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(LATENCY_BINS, dtype=np.int64))

    def merge(self, other: Traffic) -> None:
        self.instances += other.instances
        self.requests += other.requests
        self.errors += other.errors
        self.hist += other.hist

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        rate = self.error_rate
        return {
            "instances": self.instances,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": None if rate is None else round(rate, 6),
            "latency_ms": latency_quantiles(self.hist),
        }


def slo_checks(t: Traffic, cfg: MonitoringSettings) -> tuple[str, list[dict[str, Any]]]:
    """The SLO verdict of a version's hour (pass, breach or insufficient) and its checks."""
    if t.requests < cfg.min_requests:  # error rate and latency are per request
        return "insufficient", []
    rate = t.error_rate or 0.0
    q = latency_quantiles(t.hist)
    checks = [
        _slo(
            "error_rate",
            rate,
            cfg.slo_error_rate,
            f"{t.errors} of {t.requests} answers 5xx or none",
        ),
        _slo("p50_ms", q["p50"] or 0.0, cfg.slo_p50_ms, "median latency"),
        _slo("p99_ms", q["p99"] or 0.0, cfg.slo_p99_ms, "p99 latency"),
    ]
    return ("pass" if all(c["passed"] for c in checks) else "breach"), checks


def _slo(name: str, value: float, limit: float, what: str) -> dict[str, Any]:
    passed = value <= limit
    shown = (lambda v: f"{v:.2%}") if name == "error_rate" else (lambda v: f"{v:g} ms")
    detail = f"{what}: {shown(value)} {'<=' if passed else '>'} SLO {shown(limit)}"
    return {"slo": name, "passed": passed, "value": value, "limit": limit, "detail": detail}


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Dense group codes of a column and each code's text (null is UNKNOWN, the last code)."""
    enc = pc.dictionary_encode(col.combine_chunks())
    values = [str(v) for v in enc.dictionary.to_pylist()]
    codes = enc.indices
    if codes.null_count:
        codes = pc.fill_null(codes, len(values))
        values.append(UNKNOWN)
    return np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.intp), values


def _numbers(col: pa.ChunkedArray, null: float) -> np.ndarray:
    return np.asarray(pc.fill_null(col, null).to_numpy(), dtype=float)


class HourStats:
    """The hour's metrics, one table of the serving log at a time (memory flat in the rows).

    Exact: instances, requests, errors and latency histograms per (version, label); PSI bin
    counts and category counts of features and scores. Sampled: the KS tests (a seeded bottom-k
    of 20,000 values per column, so identical however the rows are split while fewer values
    than that are judged). Drift judges the rows answered 200 whose label is in ``labels``
    (None: every label): the champion's traffic, as the references describe the champion."""

    def __init__(
        self,
        spec: DatasetSpec,
        feature_reference: dict[str, Any] | None,
        score_reference: dict[str, Any] | None,
        labels: Sequence[str] | None = JUDGED_LABELS,
    ):
        self.spec = spec
        self.labels = None if labels is None else list(labels)
        self.rows = 0
        self.traffic: dict[tuple[str, str], Traffic] = {}
        self.judged = 0  # rows judged for drift
        self.scored = 0  # judged rows with a score
        # The gate's streaming PSI/KS; monitoring's own threshold (monitoring.feature_psi)
        # decides what is drift, in result().
        self.features = (
            PartitionStats(spec, feature_reference) if feature_reference is not None else None
        )
        self.score_ref = score_reference
        self.score_edges = list((score_reference or {}).get("edges") or [])
        self.score_bins = np.zeros(max(len(self.score_edges) - 1, 0), dtype=np.int64)
        self.score_sample = BottomK(SAMPLE, seed=len(spec.numeric_features))

    @property
    def columns(self) -> list[str]:
        """The serving log's columns that :meth:`add` reads."""
        return TRAFFIC_COLUMNS + self.spec.features

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.rows += table.num_rows
        self._add_traffic(table)
        ok = pc.equal(table.column("status"), 200)
        if self.labels is not None:
            ok = pc.and_(ok, pc.is_in(table.column("label"), value_set=pa.array(self.labels)))
        judged = table.select(["score", *self.spec.features]).filter(pc.fill_null(ok, False))
        self.judged += judged.num_rows
        if self.features is not None:
            self.features.add(judged.drop_columns(["score"]))
        scores = _numbers(judged.column("score"), np.nan)
        scores = scores[~np.isnan(scores)]
        self.scored += len(scores)
        self.score_sample.add(scores)
        if len(self.score_bins):
            self.score_bins += bin_counts(self.score_edges, scores)

    def _add_traffic(self, table: pa.Table) -> None:
        version, versions = _codes(table.column("version"))
        label, labels = _codes(table.column("label"))
        group = version * len(labels) + label
        k = len(versions) * len(labels)
        first = _numbers(table.column("instance"), 0) == 0
        status = _numbers(table.column("status"), 0)[first]
        latency = _numbers(table.column("latency_ms"), np.nan)[first]
        g = group[first]
        instances = np.bincount(group, minlength=k)
        requests = np.bincount(g, minlength=k)
        errors = np.bincount(g[(status < 200) | (status >= 500)], minlength=k)
        hist = np.bincount(g * LATENCY_BINS + latency_bins(latency), minlength=k * LATENCY_BINS)
        hist = hist.reshape(k, LATENCY_BINS)
        for i in np.flatnonzero(instances):  # one pass per group present, not per row
            key = (versions[i // len(labels)], labels[i % len(labels)])
            self.traffic.setdefault(key, Traffic()).merge(
                Traffic(int(instances[i]), int(requests[i]), int(errors[i]), hist[i])
            )

    def result(self, cfg: MonitoringSettings) -> dict[str, Any]:
        """The hour's metrics as JSON-ready data: ``versions`` (traffic, latency and the SLO
        verdict of each), ``labels`` (traffic per routing label, for the DAG to set the canary
        aside), ``features`` and ``prediction`` (drift), ``drift`` (a feature at or beyond
        ``monitoring.feature_psi`` with KS agreeing, or the scores drifted; whether drift is
        sustained is the caller's judgement) and
        ``slo_breaches`` (one entry per failed SLO check)."""
        by_version: dict[str, Traffic] = {}
        served: dict[str, Traffic] = {}  # what users of the stable route got from each version
        by_label: dict[str, Traffic] = {}
        mix: dict[str, dict[str, int]] = {}
        for (version, label), t in sorted(self.traffic.items()):
            by_version.setdefault(version, Traffic()).merge(t)
            by_label.setdefault(label, Traffic()).merge(t)
            mix.setdefault(version, {})[label] = t.instances
            if label in SERVED_LABELS:
                served.setdefault(version, Traffic()).merge(t)
        versions: dict[str, Any] = {}
        breaches: list[dict[str, Any]] = []
        for version in sorted(
            by_version, key=lambda v: (v == UNKNOWN, int(v) if v.isdigit() else 0)
        ):
            t = by_version[version]
            status, checks = slo_checks(t, cfg)
            versions[version] = {**t.to_dict(), "labels": mix[version], "slo": status}
            versions[version]["slo_checks"] = checks
            # The SLO a champion is held to: its answers on the stable and baseline routes
            # only (a canary's own rows, before or after it was promoted, are the judge's).
            routed, routed_checks = slo_checks(served.get(version, Traffic()), cfg)
            versions[version]["served_slo"] = routed
            versions[version]["served_slo_checks"] = routed_checks
            if status == "insufficient":
                versions[version]["slo_detail"] = (
                    f"{t.requests} requests ({t.instances} instances): SLOs are judged from "
                    f"min_requests {cfg.min_requests} requests"
                )
            breaches += [
                {"version": version, "slo": c["slo"], "detail": c["detail"]}
                for c in checks
                if not c["passed"]
            ]
        labels = {
            label: {**t.to_dict(), "versions": sorted(v for v, m in mix.items() if label in m)}
            for label, t in sorted(by_label.items())
        }
        features, prediction = self._feature_drift(cfg), self._prediction_drift(cfg)
        return {
            "rows": self.rows,
            "versions": versions,
            "labels": labels,
            "features": features,
            "prediction": prediction,
            "drift": bool(features["drifted"]) or prediction["drifted"],
            "slo_breaches": breaches,
        }

    @staticmethod
    def _unjudged(has_reference: bool, rows: int, cfg: MonitoringSettings) -> str | None:
        """Why drift is not judged (no reference, too few rows), or None."""
        if not has_reference:
            return "no_reference"
        return "insufficient" if rows < cfg.min_requests else None

    def _feature_drift(self, cfg: MonitoringSettings) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.judged, "labels": self.labels, "drifted": []}
        scope = self._unjudged(self.features is not None, self.judged, cfg)
        if scope or self.features is None:
            return {**out, "status": scope, "columns": {}}
        _, report = self.features.drift_checks()
        columns: dict[str, Any] = {}
        alpha, warn = self.spec.drift.ks_alpha, self.spec.drift.psi_warn
        for name, r in report.items():
            value, ks_p = float(r["psi"]), r.get("ks_pvalue")
            significant = ks_p is None or ks_p < alpha  # categories: PSI alone decides
            if value >= cfg.feature_psi and significant:
                level = "drift"
                detail = f"PSI {value:.3f} >= {cfg.feature_psi}" + (
                    f", KS p {ks_p:.2g} < {alpha}" if ks_p is not None else ""
                )
            elif value >= warn:
                level, detail = "warn", f"PSI {value:.3f} >= {warn} (not significant)"
            else:
                level, detail = "ok", ""
            columns[name] = {**r, "status": level, "detail": detail}
        drifted = [n for n, c in columns.items() if c["status"] == "drift"]
        return {**out, "status": "judged", "columns": columns, "drifted": drifted}

    def _prediction_drift(self, cfg: MonitoringSettings) -> dict[str, Any]:
        rows = self.scored
        out: dict[str, Any] = {"rows": rows, "drifted": False, "psi": None, "ks_pvalue": None}
        scope = self._unjudged(len(self.score_edges) > 1, rows, cfg)
        if scope:
            return {**out, "status": scope}
        value, ks_p = numeric_drift(self.score_ref or {}, self.score_bins, self.score_sample.values)
        drifted = value >= cfg.prediction_psi and ks_p < self.spec.drift.ks_alpha
        detail = (
            f"score PSI {value:.3f} {'>=' if value >= cfg.prediction_psi else '<'} "
            f"{cfg.prediction_psi}, KS p {ks_p:.2g} "
            f"{'<' if ks_p < self.spec.drift.ks_alpha else '>='} {self.spec.drift.ks_alpha}"
        )
        return {
            **out,
            "status": "judged",
            "psi": round(value, 4),
            "ks_pvalue": ks_p,
            "drifted": bool(drifted),
            "detail": detail,
            "bins": self.score_bins.tolist(),  # live counts over the reference's edges
        }


def read_serving_log(
    store: ObjectStore,
    keys: Sequence[str],
    spec: DatasetSpec,
    columns: Sequence[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[pa.Table]:
    """Yield the files' ``columns`` (default: all) as tables of at most ``batch_rows`` rows, in
    the log schema's types. Each file's schema is checked from its footer before any of its rows
    are read: a missing column or a type that does not cast raises :class:`ServingLogError`
    naming the file; a corrupt file raises :class:`PartitionUnreadable`."""
    full = schema(spec)
    names = list(columns) if columns is not None else full.names
    want = pa.schema([full.field(n).with_nullable(True) for n in names])
    for key in keys:
        uri = store.uri(key)
        try:
            with store.open(key) as fh:
                pf = pq.ParquetFile(fh)
                missing = missing_columns(spec, pf.schema_arrow)
                if missing:
                    raise ServingLogError(
                        f"{uri} is not a serving log of {spec.name}: missing column(s) "
                        f"{', '.join(missing)}."
                    )
                for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
                    yield _conform(pa.Table.from_batches([batch]).select(names), want, uri)
        except ServingLogError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise PartitionUnreadable(f"{uri} is not readable parquet: {exc}") from exc


def _conform(table: pa.Table, want: pa.Schema, uri: str) -> pa.Table:
    if table.schema.types == want.types:
        return table
    try:
        return table.cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        wrong = [
            f"{f.name} ({f.type}, expected {w.type})"
            for f, w in zip(table.schema, want, strict=True)
            if f.type != w.type
        ]
        raise ServingLogError(f"{uri}: column(s) of the wrong type: {', '.join(wrong)}.") from exc


def monitor_files(
    store: ObjectStore,
    keys: Sequence[str],
    spec: DatasetSpec,
    feature_reference: dict[str, Any] | None,
    score_reference: dict[str, Any] | None,
    cfg: MonitoringSettings,
    labels: Sequence[str] | None = JUDGED_LABELS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict[str, Any]:
    """The metrics (:meth:`HourStats.result`) of the serving-log files ``keys`` (e.g. an hour's
    ``partition_files``), read one batch at a time, plus ``files``: how many were read."""
    stats = HourStats(spec, feature_reference, score_reference, labels)
    for table in read_serving_log(store, keys, spec, stats.columns, batch_rows):
        stats.add(table)
    return {**stats.result(cfg), "files": len(keys)}
