"""Blessing rules: floors, regression judged on the CI, slice floors, behavioural rules and
recorded overrides."""

import pytest

from pipelines.config import ConfigError, EvaluateSettings, load_settings, with_overrides
from pipelines.evaluate.behaviour import BehaviourResult
from pipelines.evaluate.gate import bless, judge_slices

CFG = EvaluateSettings(min_auc=0.75, max_auc_regression=0.02)


def deltas(delta: float, lo: float, hi: float) -> dict:
    return {"roc_auc": {"delta": delta, "ci_low": lo, "ci_high": hi}}


def m(auc: float | None, rows: int, positives: int) -> dict:
    out = {"rows": float(rows), "positives": float(positives)}
    return out if auc is None else {**out, "roc_auc": auc}


SLICES = {
    "channel": {
        "atm": m(0.70, 60, 3),  # too small to judge
        "online": m(0.81, 900, 40),
        "pos": m(0.93, 2000, 20),
    },
    "merchant_category": {"gas": m(None, 300, 0)},  # a single class
}


def test_first_model_only_needs_the_floor() -> None:
    assert bless({"roc_auc": 0.9}, None, CFG).blessed
    b = bless({"roc_auc": 0.6}, None, CFG)
    assert not b.blessed and "FAIL min_auc" in b.reasons()[0]
    assert b.failed == ["min_auc"] and not b.gate_passed


def test_regression_is_judged_on_the_ci_lower_bound() -> None:
    assert bless({"roc_auc": 0.9}, deltas(-0.005, -0.015, 0.004), CFG).blessed
    b = bless({"roc_auc": 0.9}, deltas(-0.005, -0.03, 0.02), CFG)
    assert not b.blessed
    assert any("FAIL no_regression" in r for r in b.reasons())


def test_overrides_need_a_reason_and_are_recorded() -> None:
    with pytest.raises(ValueError, match="reason"):
        bless({"roc_auc": 0.6}, None, CFG, force="bless")
    with pytest.raises(ValueError, match="'bless' or 'reject'"):
        bless({"roc_auc": 0.6}, None, CFG, force="maybe", reason="x")
    b = bless({"roc_auc": 0.6}, None, CFG, force="bless", reason="hotfix INC-42")
    assert b.blessed and b.override == "bless" and b.override_reason == "hotfix INC-42"
    assert not b.gate_passed and b.to_dict()["failed"] == ["min_auc"]  # the rules still say no
    rejected = bless({"roc_auc": 0.9}, None, CFG, force="reject", reason="legal hold")
    assert not rejected.blessed and rejected.gate_passed


def test_a_slice_under_its_floor_blocks_and_names_slice_auc_floor_and_rows() -> None:
    cfg = EvaluateSettings(slice_min_auc=0.6, slice_min_auc_by_slice={"channel=online": 0.85})
    b = bless({"roc_auc": 0.9}, None, cfg, slices=SLICES)
    assert not b.blessed
    assert b.failed == ["slice_min_auc[channel=online]"]
    rule = next(r for r in b.rules if r.name == "slice_min_auc[channel=online]")
    assert rule.evidence == {
        "slice": "channel=online",
        "rows": 900,
        "positives": 40,
        "roc_auc": 0.81,
        "floor": 0.85,
    }
    assert "channel=online: ROC-AUC 0.8100 vs floor 0.85 (900 rows, 40 positives)" in rule.detail
    # the per-slice floor replaces the global one; pos is held to the global floor and passes
    assert "PASS slice_min_auc[channel=pos]: channel=pos: ROC-AUC 0.9300 vs floor 0.6" in (
        "\n".join(b.reasons())
    )


def test_small_and_single_class_slices_are_reported_not_judged_never_passed() -> None:
    cfg = EvaluateSettings(slice_min_auc=0.75, slice_min_rows=100, slice_min_class_rows=5)
    rules, table = judge_slices(SLICES, None, cfg)
    by_name = {r.name: r for r in rules}
    atm = by_name["slice_min_auc[channel=atm]"]
    assert (atm.judged, atm.passed, atm.severity, atm.verdict) == (
        False,
        False,
        "warn",
        "NOT JUDGED",
    )
    assert "60 rows < slice_min_rows 100" in atm.detail
    gas = by_name["slice_min_auc[merchant_category=gas]"]
    assert not gas.judged and "single class" in gas.detail
    status = {row["slice"]: row["status"] for row in table}
    assert status == {
        "channel=atm": "not_judged",
        "channel=online": "passed",
        "channel=pos": "passed",
        "merchant_category=gas": "not_judged",
    }
    # not judged is not a failure either: the candidate is blessed, and says what was skipped
    b = bless({"roc_auc": 0.9}, None, cfg, slices=SLICES)
    assert b.blessed and b.gate_passed
    assert any(r.startswith("NOT JUDGED slice_min_auc[channel=atm]") for r in b.reasons())


def test_too_few_positives_is_not_judged() -> None:
    cfg = EvaluateSettings(slice_min_auc=0.99, slice_min_rows=10, slice_min_class_rows=5)
    rules, _ = judge_slices({"channel": {"atm": m(0.5, 400, 4)}}, None, cfg)
    assert [r.verdict for r in rules] == ["NOT JUDGED"]
    assert "4 rows of the rarer class" in rules[0].detail


def test_without_floors_slices_are_only_reported() -> None:
    rules, table = judge_slices(SLICES, None, EvaluateSettings())
    assert rules == [] and {row["status"] for row in table} == {"no_floor"}


def test_a_floor_for_an_unknown_slice_is_reported_not_ignored() -> None:
    cfg = EvaluateSettings(slice_min_auc_by_slice={"channel=teleport": 0.8})
    b = bless({"roc_auc": 0.9}, None, cfg, slices=SLICES)
    rule = next(r for r in b.rules if r.name == "slice_min_auc[channel=teleport]")
    assert rule.verdict == "NOT JUDGED" and "not a slice of the test split" in rule.detail
    assert b.blessed


def test_slice_regression_vs_champion() -> None:
    cfg = EvaluateSettings(slice_max_auc_regression=0.05, slice_min_rows=100)
    champion = {"channel": {"online": m(0.90, 900, 40), "pos": m(0.94, 2000, 20)}}
    b = bless({"roc_auc": 0.9}, None, cfg, slices=SLICES, champion_slices=champion)
    assert b.failed == ["slice_regression[channel=online]"]
    rule = next(r for r in b.rules if r.name == "slice_regression[channel=online]")
    assert rule.evidence["delta"] == pytest.approx(-0.09)
    assert "vs champion 0.9000" in rule.detail
    # no champion: nothing to regress against, no rule
    assert bless({"roc_auc": 0.9}, None, cfg, slices=SLICES).rules[2:] == []


def test_slice_floor_keys_must_name_column_and_value() -> None:
    with pytest.raises(ValueError, match="'atm' is not 'column=value'"):
        EvaluateSettings(slice_min_auc_by_slice={"atm": 0.8})


def test_slice_floors_come_from_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = load_settings(
        {
            "MLOPS_HOME": str(tmp_path),
            "MLOPS__EVALUATE__SLICE_MIN_AUC": "0.7",
            "MLOPS__EVALUATE__SLICE_MIN_AUC_BY_SLICE": "{channel=atm: 0.8}",
        }
    )
    assert s.evaluate.slice_min_auc == 0.7
    assert s.evaluate.slice_min_auc_by_slice == {"channel=atm": 0.8}
    with pytest.raises(ConfigError, match="slice_min_auc_by_slice"):
        with_overrides(s, evaluate={"slice_min_auc_by_slice": {"bad": 0.8}})


def result(passed: bool, severity: str = "block", judged: bool = True) -> BehaviourResult:
    return BehaviourResult(
        "memo_is_ignored", "invariance", passed, judged, severity, "moved 3 of 10 scores"
    )


def test_behavioural_failures_block_unless_warn() -> None:
    b = bless({"roc_auc": 0.9}, None, CFG, behaviour=[result(False)])
    assert not b.blessed and b.failed == ["behaviour.invariance.memo_is_ignored"]
    assert "FAIL behaviour.invariance.memo_is_ignored: moved 3 of 10 scores" in b.reasons()
    warned = bless({"roc_auc": 0.9}, None, CFG, behaviour=[result(False, "warn")])
    assert warned.blessed and "WARN behaviour.invariance.memo_is_ignored" in warned.reasons()[-1]
    assert bless({"roc_auc": 0.9}, None, CFG, behaviour=[result(True)]).blessed
    skipped = bless({"roc_auc": 0.9}, None, CFG, behaviour=[result(False, judged=False)])
    assert skipped.blessed and skipped.rules[-1].verdict == "NOT JUDGED"


def test_blessing_serialises_verdicts_and_reasons() -> None:
    d = bless({"roc_auc": 0.6}, None, CFG, behaviour=[result(True)]).to_dict()
    assert [r["verdict"] for r in d["rules"]] == ["FAIL", "PASS", "PASS"]
    assert d["gate_passed"] is False and d["failed"] == ["min_auc"]
    assert d["reasons"][0].startswith("FAIL min_auc: ROC-AUC 0.6000")
