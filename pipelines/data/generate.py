"""Synthetic landing data: ``transactions`` (card fraud), with drift and defect injection.

Output is ``landing/<dataset>/dt=YYYY-MM-DD/part-00000.parquet``; the same date, rows, drift and
defect always give the same bytes (the seed is derived from them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data import layout
from pipelines.data.spec import DatasetSpec
from pipelines.store import ObjectStore

log = logging.getLogger(__name__)

DEFECTS = (
    "missing_column",
    "extra_column",
    "wrong_dtype",
    "nulls",
    "out_of_range",
    "unseen_category",
    "duplicate_ids",
    "empty",
    "corrupt",
    "label_leakage",
    "pii",
    "single_class",
    "severe_drift",
    "stale_events",
    "future_events",
)

_CATEGORIES = [
    "grocery",
    "restaurants",
    "gas",
    "travel",
    "electronics",
    "online_retail",
    "jewelry",
    "gaming",
]
_CAT_P = np.array([0.26, 0.2, 0.14, 0.07, 0.08, 0.17, 0.03, 0.05])
_RISKY = {"electronics": 0.9, "jewelry": 1.2, "gaming": 0.8, "online_retail": 0.4, "travel": 0.3}
_COUNTRIES = ["US", "GB", "DE", "FR", "BR", "IN", "NG", "OTHER"]
_COUNTRY_P = np.array([0.5, 0.12, 0.1, 0.08, 0.06, 0.06, 0.03, 0.05])


ROW_GROUP_ROWS = 131_072


class GenerateError(ValueError):
    """Raised for an unknown dataset or defect."""


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _calibrated_intercept(logit: np.ndarray, prevalence: float) -> float:
    """Shift so the mean fraud probability equals ``prevalence`` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(logit + mid)))).mean() > prevalence:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def transactions(date: dt.date, rows: int, drift: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Card transactions for one day. ``drift`` in [0, 1] shifts amounts, channels and geography."""
    rng = np.random.default_rng(_seed("transactions", date.isoformat(), rows, drift, seed))
    n = rows
    start = pd.Timestamp(date.isoformat(), tz="UTC")
    seconds = np.sort(rng.integers(0, 86400, n))
    event_time = start + pd.to_timedelta(seconds, unit="s")
    hour = (seconds // 3600).astype("int64")
    cat_p = _CAT_P.copy()
    cat_p[5] += 0.1 * drift
    cat_p /= cat_p.sum()
    category = rng.choice(_CATEGORIES, size=n, p=cat_p)
    online_p = 0.3 + 0.2 * drift
    channel = rng.choice(["pos", "online", "atm"], size=n, p=[0.9 - online_p, online_p, 0.1])
    country_p = _COUNTRY_P.copy()
    country_p[0] -= 0.1 * drift
    country_p[7] += 0.1 * drift
    country = rng.choice(_COUNTRIES, size=n, p=country_p)
    amount = np.round(np.clip(rng.lognormal(3.4 + 0.4 * drift, 1.1, n), 0.5, 50000.0), 2)
    card_age = np.clip(rng.gamma(1.5, 500.0, n), 0, 7300).astype("int64")
    distance = np.round(np.clip(rng.lognormal(2.0, 1.4, n), 0.0, 20000.0), 3)
    velocity = rng.poisson(2.5, n).astype("int64")

    logit = (
        0.55 * (np.log(amount) - 3.4)
        + 1.1 * (channel == "online")
        + 0.6 * (channel == "atm")
        + np.array([_RISKY.get(c, 0.0) for c in category])
        + 0.9 * (hour < 6)
        + 0.35 * np.log1p(distance)
        - 0.0008 * card_age
        + 0.25 * velocity
        + 0.9 * np.isin(country, ["NG", "OTHER"])
    )
    logit = 2.2 * logit  # signal strength: a good model reaches ROC-AUC ~0.9
    logit = logit + _calibrated_intercept(logit, 0.02)
    is_fraud = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int64")

    memo_words = np.array(["purchase", "refund adj", "subscription", "cash withdrawal", "order"])
    memo = pd.Series(rng.choice(memo_words, size=n), dtype="object")
    memo[rng.random(n) < 0.3] = None
    card_no = rng.integers(0, max(n // 4, 10), n).astype(str)
    card_ids = np.char.add("card-", np.char.zfill(card_no, 6))
    return pd.DataFrame(
        {
            "transaction_id": [f"{date:%Y%m%d}-{i:08d}" for i in range(n)],
            "card_id": card_ids.astype(object),
            "event_time": event_time,
            "amount": amount,
            "merchant_category": category.astype(object),
            "channel": channel.astype(object),
            "country": country.astype(object),
            "hour": hour,
            "card_age_days": card_age,
            "distance_km": distance,
            "txn_count_24h": velocity,
            "memo": memo,
            "is_fraud": is_fraud,
        }
    )


def breast_cancer(date: dt.date, rows: int, drift: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """scikit-learn's bundled breast-cancer data, resampled for one day with 2% noise.

    ``drift`` scales the measurements up by up to 10%. Columns are the ten ``mean *`` features
    in snake_case, a patient id (the original row) and the label ``malignant``."""
    from sklearn.datasets import load_breast_cancer

    rng = np.random.default_rng(_seed("breast_cancer", date.isoformat(), rows, drift, seed))
    frame = load_breast_cancer(as_frame=True).frame
    features = [c for c in frame.columns if c.startswith("mean ")]
    pick = rng.integers(0, len(frame), rows)
    base = frame[features].to_numpy()[pick]
    noise = rng.normal(0.0, 0.02, base.shape) * frame[features].std().to_numpy()
    values = np.clip((base + noise) * (1.0 + 0.1 * drift), 0.0, None)
    out = pd.DataFrame(values, columns=[c.replace(" ", "_") for c in features])
    out.insert(0, "patient_id", [f"patient-{i:04d}" for i in pick])
    out.insert(0, "sample_id", [f"{date:%Y%m%d}-{i:06d}" for i in range(rows)])
    out["malignant"] = (1 - frame["target"].to_numpy()[pick]).astype("int64")
    return out


GENERATORS = {"transactions": transactions, "breast_cancer": breast_cancer}


def inject_defect(df: pd.DataFrame, spec: DatasetSpec, defect: str, seed: int = 0) -> pd.DataFrame:
    """Return a copy of ``df`` with one defect injected (see :data:`DEFECTS`)."""
    rng = np.random.default_rng(_seed("defect", defect, seed))
    df = df.copy()
    n = len(df)
    some = rng.choice(n, size=max(1, n // 50), replace=False) if n else np.array([], dtype=int)
    numeric = spec.numeric_features[0]
    categorical = spec.categorical_features[0]
    if defect == "missing_column":
        df = df.drop(columns=[spec.numeric_features[-1]])
    elif defect == "extra_column":
        df["unexpected_extra"] = 1
    elif defect == "wrong_dtype":
        df[numeric] = df[numeric].astype(str)
    elif defect == "nulls":
        df[numeric] = df[numeric].astype("float64")
        df.loc[some, numeric] = np.nan
    elif defect == "out_of_range":
        df[numeric] = df[numeric].astype("float64")
        df.loc[some, numeric] = -abs(df.loc[some, numeric].astype(float)) - 1.0
    elif defect == "unseen_category":
        df.loc[some, categorical] = "never_seen_before"
    elif defect == "duplicate_ids":
        df.loc[some, spec.key] = df[spec.key].iloc[0]
    elif defect == "empty":
        df = df.iloc[0:0]
    elif defect == "label_leakage":
        df[numeric] = df[spec.label].astype(df[numeric].dtype)
    elif defect == "pii":
        pii = next(c.name for c in spec.columns if c.pii)
        df[pii] = df[pii].astype(object)
        df.loc[some[::2], pii] = "contact jane.doe@example.com"
        df.loc[some[1::2], pii] = "card 4111 1111 1111 1111"
    elif defect == "single_class":
        df[spec.label] = 0
    elif defect == "severe_drift":
        for col in spec.numeric_features:
            c = spec.column(col)
            if c.type == "float" and c.max is not None:
                df[col] = np.clip(df[col].astype(float) * 6.0, c.min or 0.0, c.max)
        df[categorical] = spec.vocab(categorical)[-1]
    elif defect in ("stale_events", "future_events"):
        if not spec.event_time:
            raise GenerateError(f"Dataset {spec.name} has no event_time for {defect!r}.")
        shift = pd.Timedelta(days=-3 if defect == "stale_events" else 3)
        df[spec.event_time] = df[spec.event_time] + shift
    elif defect != "corrupt":
        raise GenerateError(f"Unknown defect {defect!r}; known: {', '.join(DEFECTS)}.")
    return df


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    table = pa.Table.from_pandas(df, preserve_index=False)
    # Row groups of 128Ki rows: readers can stream the file a row group at a time.
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def generate_partition(
    store: ObjectStore,
    spec: DatasetSpec,
    date: str,
    rows: int,
    drift: float = 0.0,
    defect: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Write one landing partition and return its URI. A day that already has data is refused
    unless ``overwrite``; then everything under it goes, its validation report included, and
    the log names what was removed."""
    if spec.name not in GENERATORS:
        raise GenerateError(
            f"No generator for dataset {spec.name!r}; land its data under "
            f"{layout.landing(spec.name, date)}/ yourself. Known: {sorted(GENERATORS)}."
        )
    if defect is not None and defect not in DEFECTS:
        raise GenerateError(f"Unknown defect {defect!r}; known: {', '.join(DEFECTS)}.")
    day = dt.date.fromisoformat(date)
    prefix = layout.landing(spec.name, day)
    existing = store.list(prefix, recursive=True)
    if existing and not overwrite:
        raise GenerateError(
            f"{store.uri(prefix)} already holds {len(existing)} file(s) (landed data and its "
            "validation report); pass --overwrite to replace them."
        )
    df = GENERATORS[spec.name](day, rows, drift=drift, seed=seed)
    if defect:
        df = inject_defect(df, spec, defect, seed)
    data = to_parquet_bytes(df)
    if defect == "corrupt":
        data = data[: len(data) // 2]
    if existing:
        log.warning("replacing %s: removing %s", store.uri(prefix), ", ".join(existing))
        store.delete(prefix, recursive=True)
    store.write_bytes(f"{prefix}/part-00000.parquet", data)
    return store.uri(prefix)
