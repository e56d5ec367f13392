"""``mlops traffic``: a day's requests replayed through the data plane, as clients would send
them, for the demo and the monitoring tests.

The requests are the held-out rows of the day's landing partition: the rows whose entity the
shard stage's hash split puts in validation or test (``split_of``), so no model trained on that
day has seen them. Each keeps its own key, so the labels that land for them later join back.
With ``drift`` they are the rows the dataset's generator draws for that day with that drift
(live traffic drifting before any of it lands). Only the model's features are sent, in TF
Serving's row format."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.data.batches import iter_partition
from pipelines.data.spec import DatasetSpec, load_spec
from pipelines.store import open_store

log = logging.getLogger(__name__)


class TrafficError(ValueError):
    """No rows to replay for the day."""


def day_rows(settings: Settings, spec: DatasetSpec, date: str, drift: float) -> pd.DataFrame:
    """The day's requests: the landing partition, or the generator's rows with ``drift``."""
    from pipelines.data.generate import GENERATORS

    if drift:
        if spec.name not in GENERATORS:
            raise TrafficError(f"Dataset {spec.name!r} has no generator to draw drifted rows.")
        import datetime as dt

        return GENERATORS[spec.name](
            dt.date.fromisoformat(date), settings.data.rows_per_day, drift=drift
        )
    from pipelines.data.shard import split_of

    store = open_store(settings.store)
    prefix = layout.landing(spec.name, date)
    columns = list(dict.fromkeys([spec.key, spec.entity, *spec.features]))
    tables = list(iter_partition(store, prefix, columns=columns))
    if not tables or not sum(t.num_rows for t in tables):
        raise TrafficError(
            f"No rows under {store.uri(prefix)} to replay; generate the day first "
            f"(mlops data generate --date {date}) or pass --drift."
        )
    df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    held_out = split_of(df[spec.entity], settings.data.split_fractions) != 0
    return df[held_out].reset_index(drop=True)


def instances(df: pd.DataFrame, spec: DatasetSpec) -> list[tuple[str, dict[str, Any]]]:
    """(key, TF Serving row instance) per row: numbers as floats (null for missing), categories
    as text."""
    out = []
    nums = {n: df[n].astype(float).to_numpy() for n in spec.numeric_features}
    cats = {n: df[n].astype(str).to_numpy() for n in spec.categorical_features}
    for i, key in enumerate(df[spec.key].astype(str)):
        row: dict[str, Any] = {
            n: (None if np.isnan(v[i]) else float(v[i])) for n, v in nums.items()
        }
        row.update({n: str(v[i]) for n, v in cats.items()})
        out.append((key, row))
    return out


def day_requests(
    settings: Settings, spec: DatasetSpec, date: str, drift: float = 0.0, seed: int = 0
) -> list[tuple[str, dict[str, Any]]]:
    """The day's (key, instance) pairs in the order :func:`send` replays them: a ``seed``ed
    shuffle, because a day's file is in event order and clients arrive through the whole day
    (the first rows alone are all from its first hour)."""
    rows = instances(day_rows(settings, spec, date, drift), spec)
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def send(
    settings: Settings,
    date: str,
    rate: float,
    requests: int | None = None,
    drift: float = 0.0,
    concurrency: int = 4,
    dataset: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Replay ``requests`` of the day's rows (default: all of them once, in a ``seed``ed random
    order) at ``rate`` req/s;
    returns once the data plane has logged them (``logged``: its records since the start)."""
    from pipelines import stages
    from pipelines.serving.monitor import replay

    spec = load_spec(dataset or settings.data.dataset, settings.data.spec_dir)
    rows = day_requests(settings, spec, date, drift, seed)
    n = len(rows) if requests is None else int(requests)
    control = stages.serving_control(settings)
    control.ensure_running()
    t0 = time.time()
    _, ids = replay(
        control.endpoint(),
        settings.mlflow.model_name,
        rows,
        n,
        rate,
        concurrency,
        0,
        fresh_keys=False,
    )
    t1 = time.time()
    logged = len(control.window(t0, request_ids=ids))  # returns once the plane logged them all
    log.debug("sent %d requests of %s (drift %g) in %.1f s", n, date, drift, t1 - t0)
    return {
        "date": date,
        "drift": drift,
        "requests": n,
        "logged": logged,
        "seconds": round(t1 - t0, 3),
        "started": t0,
        "ended": t1,
        "hours": [  # every UTC hour the requests fall in (what to monitor)
            time.strftime("%Y-%m-%dT%H", time.gmtime(h * 3600))
            for h in range(int(t0 // 3600), int(t1 // 3600) + 1)
        ],
        "data_plane": control.endpoint(),
    }
