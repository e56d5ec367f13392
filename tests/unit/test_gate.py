"""Blessing rules: floors, regression judged on the CI, and recorded overrides."""

import pytest

from pipelines.config import EvaluateSettings
from pipelines.evaluate.gate import bless

CFG = EvaluateSettings(min_auc=0.75, max_auc_regression=0.02)


def deltas(delta: float, lo: float, hi: float) -> dict:
    return {"roc_auc": {"delta": delta, "ci_low": lo, "ci_high": hi}}


def test_first_model_only_needs_the_floor() -> None:
    assert bless({"roc_auc": 0.9}, None, CFG).blessed
    b = bless({"roc_auc": 0.6}, None, CFG)
    assert not b.blessed and "FAIL min_auc" in b.reasons()[0]


def test_regression_is_judged_on_the_ci_lower_bound() -> None:
    assert bless({"roc_auc": 0.9}, deltas(-0.005, -0.015, 0.004), CFG).blessed
    b = bless({"roc_auc": 0.9}, deltas(-0.005, -0.03, 0.02), CFG)
    assert not b.blessed
    assert any("FAIL no_regression" in r for r in b.reasons())


def test_overrides_need_a_reason_and_are_recorded() -> None:
    with pytest.raises(ValueError, match="reason"):
        bless({"roc_auc": 0.6}, None, CFG, force="bless")
    b = bless({"roc_auc": 0.6}, None, CFG, force="bless", reason="hotfix INC-42")
    assert b.blessed and b.override == "bless" and b.override_reason == "hotfix INC-42"
    assert not bless({"roc_auc": 0.9}, None, CFG, force="reject", reason="legal hold").blessed
