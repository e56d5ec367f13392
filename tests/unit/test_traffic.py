"""``mlops traffic`` replays held-out rows only: the day's rows whose entity the shard stage's
hash split puts outside training, with their own keys."""

from __future__ import annotations

import pandas as pd

from pipelines import stages
from pipelines.data import layout
from pipelines.data.shard import split_of
from pipelines.data.spec import load_spec
from pipelines.monitoring.traffic import day_requests, day_rows


def test_the_replayed_rows_are_the_days_held_out_rows(local_settings) -> None:  # type: ignore[no-untyped-def]
    s = local_settings
    spec = load_spec("transactions")
    stages.generate_data(s, "2026-11-01", rows=3000)
    landed = pd.read_parquet(
        f"{s.store.root.removeprefix('file://')}/{layout.landing(spec.name, '2026-11-01')}"
    )
    split = split_of(landed[spec.entity], s.data.split_fractions)
    held = set(landed.loc[split != 0, spec.key].astype(str))
    assert 0 < len(held) < len(landed)  # some rows are training rows and must not be replayed
    rows = day_rows(s, spec, "2026-11-01", drift=0.0)
    assert set(rows[spec.key].astype(str)) == held and len(rows) == len(held)
    keys = [k for k, _ in day_requests(s, spec, "2026-11-01")]
    assert sorted(keys) == sorted(held)  # every held-out row once, in a shuffled order
    assert keys != sorted(keys)
