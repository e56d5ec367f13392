"""The data gate: a Great Expectations suite built from the dataset spec, plus drift and leakage.

Each check has a severity: ``block`` stops the run and moves the batch to ``quarantine/``;
``warn`` is reported and lets the batch through. The JSON summary and GE's HTML page are stored
under ``<partition>/_validation/`` so they travel with the batch.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from pipelines.data import layout
from pipelines.data.spec import ColumnSpec, DatasetSpec
from pipelines.store import ObjectStore

log = logging.getLogger(__name__)

# What a PII column must never contain: e-mail addresses and card-number-like digit runs.
PII_PATTERNS = [r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", r"\b(?:\d[ -]?){13,19}\b"]
_PANDAS_TYPES = {
    "string": ["str", "object"],
    "category": ["str", "object"],
    "float": ["float64", "float32", "Float64", "Float32"],
    "int": ["int64", "int32", "int16", "int8", "Int64", "Int32"],
    "timestamp": ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]"],
}
PSI_BINS = 10
_PII_RE = [re.compile(p) for p in PII_PATTERNS]


def mask_pii(value: Any) -> Any:
    """Mask e-mails and card numbers so reports and logs never repeat them."""
    if not isinstance(value, str):
        return value
    for rx, token in zip(_PII_RE, ("<email>", "<card-number>"), strict=True):
        value = rx.sub(token, value)
    return value


class ValidationBlocked(RuntimeError):
    """The batch failed a blocking check; it has been quarantined."""

    def __init__(self, summary: ValidationSummary):
        self.summary = summary
        super().__init__(summary.message())


@dataclass
class CheckResult:
    check: str
    column: str | None
    severity: str
    success: bool
    detail: str = ""
    examples: list[Any] = field(default_factory=list)


@dataclass
class ValidationSummary:
    dataset: str
    date: str
    rows: int
    status: str  # accepted | warned | blocked
    checks: list[CheckResult]
    drift: dict[str, dict[str, float]]
    report_uri: str = ""
    quarantine_uri: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status != "blocked"

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def message(self) -> str:
        lines = [f"{self.dataset} {self.date}: {self.status.upper()} ({self.rows} rows)"]
        for c in self.failures:
            col = f" column={c.column}" if c.column else ""
            ex = f" examples={c.examples[:5]}" if c.examples else ""
            lines.append(f"  [{c.severity}] {c.check}{col}: {c.detail}{ex}")
        if self.quarantine_uri:
            lines.append(f"  batch moved to {self.quarantine_uri}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accepted"] = self.accepted
        return d


# -- reading ------------------------------------------------------------------------------
def read_partition(store: ObjectStore, prefix: str) -> tuple[pd.DataFrame | None, str | None]:
    """Concatenate the partition's parquet files; (None, reason) when unreadable."""
    files = [k for k in store.list(prefix) if k.endswith(".parquet")]
    if not files:
        return pd.DataFrame(), None
    frames = []
    for key in files:
        try:
            with store.open(key) as fh:
                frames.append(pq.read_table(io.BytesIO(fh.read())).to_pandas())
        except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
            return None, f"{store.uri(key)} is not readable parquet: {exc}"
    return pd.concat(frames, ignore_index=True), None


# -- the Great Expectations suite ---------------------------------------------------------
def _expectations(spec: DatasetSpec) -> list[tuple[Any, str]]:
    """(expectation, severity) pairs built from the spec; comments say what each guards."""
    import great_expectations.expectations as gxe

    out: list[tuple[Any, str]] = [
        # Schema drift upstream: a column renamed, dropped or added.
        (gxe.ExpectTableColumnsToMatchSet(column_set=spec.column_names, exact_match=True), "block"),
        # Empty or truncated extracts.
        (gxe.ExpectTableRowCountToBeBetween(min_value=spec.min_rows), "block"),
        # Duplicate rows from a replayed extract.
        (gxe.ExpectColumnValuesToBeUnique(column=spec.key), "block"),
        # A label with one class cannot train or evaluate a classifier.
        (
            gxe.ExpectColumnDistinctValuesToContainSet(
                column=spec.label, value_set=list(spec.column(spec.label).values or [])
            ),
            "block",
        ),
    ]
    for col in spec.columns:
        out.extend(_column_expectations(col))
    return out


def _column_expectations(col: ColumnSpec) -> list[tuple[Any, str]]:
    import great_expectations.expectations as gxe

    out: list[tuple[Any, str]] = [
        # A type change (numbers arriving as strings) silently breaks features.
        (
            gxe.ExpectColumnValuesToBeInTypeList(
                column=col.name, type_list=_PANDAS_TYPES[col.type]
            ),
            "block",
        ),
    ]
    if not col.nullable:
        out.append((gxe.ExpectColumnValuesToNotBeNull(column=col.name), "block"))
    if col.is_numeric and (col.min is not None or col.max is not None):
        out.append(
            (
                gxe.ExpectColumnValuesToBeBetween(
                    column=col.name, min_value=col.min, max_value=col.max
                ),
                "block",
            )
        )
    if col.values is not None:
        severity = col.unseen if col.type == "category" else "block"
        out.append(
            (gxe.ExpectColumnValuesToBeInSet(column=col.name, value_set=list(col.values)), severity)
        )
    if col.pii:
        # Free text must not carry e-mails or card numbers into the lake.
        out.append(
            (
                gxe.ExpectColumnValuesToNotMatchRegexList(column=col.name, regex_list=PII_PATTERNS),
                "block",
            )
        )
    return out


def _ge_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GE 1.24 cannot match pandas 3's ``str`` dtype or tz-aware timestamps in its type checks:
    present strings as ``object`` and timestamps as naive UTC (values are unchanged)."""
    out = df.copy(deep=False)
    for name, dtype in df.dtypes.items():
        if isinstance(dtype, pd.StringDtype):
            out[name] = df[name].astype(object)
        elif isinstance(dtype, pd.DatetimeTZDtype):
            out[name] = df[name].dt.tz_convert("UTC").dt.tz_localize(None)
    return out


def run_expectations(df: pd.DataFrame, spec: DatasetSpec) -> tuple[list[CheckResult], str]:
    """Validate ``df`` with GE; returns check results and GE's rendered HTML page."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = {"globally": False}  # type: ignore[assignment]
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    batch_def = (
        ctx.data_sources.add_pandas(f"{spec.name}_src")
        .add_dataframe_asset(spec.name)
        .add_batch_definition_whole_dataframe("batch")
    )
    suite = gx.ExpectationSuite(name=f"{spec.name}_suite")
    for exp, severity in _expectations(spec):
        exp.meta = {"severity": severity}
        suite.add_expectation(exp)
    result = batch_def.get_batch(batch_parameters={"dataframe": _ge_frame(df)}).validate(
        suite, result_format="SUMMARY"
    )
    checks = []
    for res in result.results:
        d: dict[str, Any] = dict(res.to_json_dict())
        cfg = d["expectation_config"]
        severity = (cfg.get("meta") or {}).get("severity", "block")
        r = d.get("result") or {}
        exc = d.get("exception_info") or {}
        if exc.get("raised_exception"):
            detail = f"could not be evaluated: {exc.get('exception_message')}"
        elif "unexpected_count" in r:
            detail = f"{r['unexpected_count']} unexpected of {r.get('element_count')}"
            if "observed_value" in r:
                detail += f" (observed {r['observed_value']})"
        else:
            detail = f"observed {r.get('observed_value')}"
        mismatched = (r.get("details") or {}).get("mismatched")
        if mismatched:
            detail = f"columns differ from the spec: {mismatched}"
        checks.append(
            CheckResult(
                check=cfg["type"],
                column=cfg["kwargs"].get("column"),
                severity=severity,
                success=bool(d["success"]),
                detail=detail if not d["success"] else "",
                examples=[mask_pii(_jsonable(v)) for v in r.get("partial_unexpected_list") or []][
                    :10
                ],
            )
        )
    html = ""
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultJinjaPageView

        page = DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
        html = mask_pii(page)  # offending values are shown; personal data must not be
    except Exception as exc:  # noqa: BLE001 - the JSON summary is the contract; HTML is a view
        log.warning("Could not render GE Data Docs page: %s", exc)
    return checks, html


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (pd.Timestamp, dt.datetime, dt.date)):
        return v.isoformat()
    return v


# -- custom checks: leakage and drift -----------------------------------------------------
def leakage_checks(df: pd.DataFrame, spec: DatasetSpec) -> list[CheckResult]:
    """A feature almost perfectly correlated with the label is leakage, not signal."""
    out: list[CheckResult] = []
    if spec.label not in df or df[spec.label].nunique() < 2:
        return out
    y = pd.to_numeric(df[spec.label], errors="coerce")
    for name in spec.numeric_features:
        if name not in df:
            continue
        x = pd.to_numeric(df[name], errors="coerce")
        if x.nunique() < 2:
            continue
        corr = float(np.corrcoef(x.fillna(x.mean()), y.fillna(0))[0, 1])
        ok = not abs(corr) >= 0.95
        out.append(
            CheckResult(
                "label_leakage",
                name,
                "block",
                ok,
                "" if ok else f"correlation with {spec.label} is {corr:.3f}",
            )
        )
    return out


def profile(df: pd.DataFrame, spec: DatasetSpec, sample: int = 2000) -> dict[str, Any]:
    """Reference profile of an accepted batch: quantile bins, category shares, a value sample."""
    prof: dict[str, Any] = {"rows": len(df), "numeric": {}, "categorical": {}}
    rng = np.random.default_rng(0)
    for name in spec.numeric_features:
        x = df[name].astype(float).dropna().to_numpy()
        edges = np.unique(np.quantile(x, np.linspace(0, 1, PSI_BINS + 1))) if len(x) else x[:0]
        pick = rng.choice(len(x), size=min(sample, len(x)), replace=False)
        prof["numeric"][name] = {
            "edges": list(map(float, edges)),
            "sample": list(map(float, np.sort(x[pick]))),
        }
    for name in spec.categorical_features:
        shares = df[name].astype(str).value_counts(normalize=True)
        prof["categorical"][name] = {str(k): float(v) for k, v in shares.items()}
    return prof


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two share vectors over the same bins."""
    e = np.clip(np.asarray(expected, float), eps, None)
    a = np.clip(np.asarray(actual, float), eps, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def drift_checks(
    df: pd.DataFrame, spec: DatasetSpec, ref: dict[str, Any]
) -> tuple[list[CheckResult], dict[str, dict[str, float]]]:
    """PSI (and KS for numbers) of each feature against the reference profile."""
    checks, report = [], {}
    d = spec.drift
    severity = "block" if d.block else "warn"
    for name, r in ref.get("numeric", {}).items():
        if name not in df or not r["edges"]:
            continue
        x = pd.to_numeric(df[name], errors="coerce").dropna().to_numpy()
        if not len(x):
            continue
        edges = np.asarray(r["edges"])
        inner = edges[1:-1]
        ref_sample = np.asarray(r["sample"])
        e = np.bincount(np.searchsorted(inner, ref_sample, side="right"), minlength=len(edges) - 1)
        a = np.bincount(np.searchsorted(inner, x, side="right"), minlength=len(edges) - 1)
        value = psi(e, a)
        ks_p = float(stats.ks_2samp(ref_sample, x).pvalue)
        report[name] = {"psi": round(value, 4), "ks_pvalue": ks_p}
        checks.append(
            _drift_result(name, value, ks_p, d.psi_warn, d.psi_block, d.ks_alpha, severity)
        )
    for name, shares in ref.get("categorical", {}).items():
        if name not in df:
            continue
        cur = df[name].astype(str).value_counts(normalize=True)
        keys = sorted(set(shares) | set(cur.index))
        value = psi(
            np.array([shares.get(k, 0.0) for k in keys]),
            np.array([float(cur.get(k, 0.0)) for k in keys]),
        )
        report[name] = {"psi": round(value, 4)}
        checks.append(_drift_result(name, value, 0.0, d.psi_warn, d.psi_block, 1.0, severity))
    return checks, report


def _drift_result(
    name: str, value: float, p: float, warn: float, block: float, alpha: float, severity: str
) -> CheckResult:
    if value >= block and p < alpha:
        return CheckResult(
            "feature_drift",
            name,
            severity,
            False,
            f"PSI {value:.3f} >= {block} against the reference batch",
        )
    if value >= warn:
        return CheckResult(
            "feature_drift", name, "warn", False, f"PSI {value:.3f} >= {warn} (moderate drift)"
        )
    return CheckResult("feature_drift", name, severity, True)


def latest_reference(store: ObjectStore, dataset: str, before: str) -> dict[str, Any] | None:
    """Profile of the last batch accepted strictly before ``before`` (backfill-safe)."""
    cutoff = layout.partition(before)
    parts = [k.rsplit("/", 1)[-1] for k in store.list(layout.reference(dataset))]
    older = sorted(p for p in parts if p.startswith("dt=") and p < cutoff)
    if not older:
        return None
    return json.loads(store.read_text(f"{layout.reference(dataset)}/{older[-1]}/profile.json"))


# -- the stage ----------------------------------------------------------------------------
def validate_partition(store: ObjectStore, spec: DatasetSpec, date: str) -> ValidationSummary:
    """Validate ``landing/<dataset>/dt=<date>``; quarantine it and raise if a check blocks."""
    prefix = layout.landing(spec.name, date)
    if not store.exists(prefix):
        moved = store.list(layout.quarantine(spec.name, date))
        hint = f" It was quarantined earlier: {store.uri(moved[0])}." if moved else ""
        raise FileNotFoundError(f"No landing partition at {store.uri(prefix)}.{hint}")
    df, read_error = read_partition(store, prefix)
    checks: list[CheckResult] = []
    html = ""
    drift: dict[str, dict[str, float]] = {}
    if df is None:
        checks.append(CheckResult("readable_parquet", None, "block", False, str(read_error)))
        rows = 0
    else:
        rows = len(df)
        checks, html = run_expectations(df, spec)
        checks += leakage_checks(df, spec)
        ref = latest_reference(store, spec.name, date)
        if ref is not None and rows:
            drift_results, drift = drift_checks(df, spec, ref)
            checks += drift_results
    blocked = any(not c.success and c.severity == "block" for c in checks)
    warned = any(not c.success for c in checks)
    status = "blocked" if blocked else ("warned" if warned else "accepted")
    summary = ValidationSummary(spec.name, date[:10], rows, status, checks, drift)
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
        log.error("%s", summary.message())
        raise ValidationBlocked(summary)
    store.write_text(f"{report_prefix}/summary.json", json.dumps(summary.to_dict(), indent=2))
    assert df is not None  # an unreadable batch is always blocked above
    store.write_text(
        f"{layout.reference(spec.name, date)}/profile.json", json.dumps(profile(df, spec))
    )
    log.info("%s", summary.message())
    return summary
