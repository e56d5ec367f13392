"""Each version's operating threshold, chosen on its validation rows by the configured policy."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import EvaluateSettings
from pipelines.evaluate.threshold import operating_threshold, recorded


def _rows(n: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """About 2 % positives, scored like the demo's models: all well below 0.5."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.02).astype(int)
    p = np.clip(rng.beta(1, 60, n) + y * rng.uniform(0.0, 0.2, n), 0, 1)
    return y, p


def test_the_alert_rate_policy_flags_that_share_of_rows() -> None:
    y, p = _rows()
    op = operating_threshold(y, p, EvaluateSettings(alert_rate=0.02))
    assert op["policy"] == "alert_rate" and op["warning"] is None
    assert op["flag_rate"] == pytest.approx(0.02, abs=1e-3)
    assert int(np.sum(p >= op["value"])) == 100  # the top 2 % of 5,000
    assert op["precision"] > 0.2 and op["recall"] > 0.2  # it decides something


def test_the_target_precision_policy_takes_the_most_recall_at_that_precision() -> None:
    y, p = _rows()
    op = operating_threshold(y, p, EvaluateSettings(threshold_policy="target_precision"))
    assert op["precision"] >= 0.5 and op["warning"] is None
    lower = p[p < op["value"]].max()  # one more row flagged: below the target
    flagged = p >= lower
    assert np.sum(flagged & (y == 1)) / flagged.sum() < 0.5
    unreachable = EvaluateSettings(threshold_policy="target_precision", target_precision=1.0)
    op = operating_threshold(np.array([0, 1, 0, 1]), np.array([0.9, 0.8, 0.7, 0.1]), unreachable)
    assert "no threshold reaches precision 1" in op["warning"]


def test_a_fixed_threshold_that_flags_nothing_says_so() -> None:
    y, p = _rows()
    op = operating_threshold(y, p, EvaluateSettings(threshold_policy="fixed", threshold=0.5))
    assert op["value"] == 0.5 and op["flag_rate"] < 0.001
    assert "decides (almost) nothing" in op["warning"]
    with pytest.raises(ValueError, match="No validation rows"):
        operating_threshold(y[:0], p[:0], EvaluateSettings())


def test_a_runs_recorded_threshold_is_read_back() -> None:
    assert recorded({"mlops.operating_threshold": "0.0731"}) == 0.0731
    assert recorded({}) is None and recorded({"mlops.operating_threshold": "x"}) is None
