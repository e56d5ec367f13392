"""Behavioural tests: spec parsing, perturbations, and scorers that pass or break them."""

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.data.generate import transactions
from pipelines.data.spec import SpecError, load_spec, parse_spec
from pipelines.evaluate.behaviour import perturb, run_behaviour
from pipelines.train.model import TabularMLP, predict_proba

SPEC = load_spec("transactions")
ROWS = transactions(dt.date(2026, 11, 1), 400)


def tabular_model(seed: int = 0) -> TabularMLP:
    """An untrained model of the transactions features: the project's own scorer."""
    torch.manual_seed(seed)
    stats = {
        n: {"mean": float(ROWS[n].mean()), "std": float(ROWS[n].std())}
        for n in SPEC.numeric_features
    }
    vocab = {n: SPEC.vocab(n) for n in SPEC.categorical_features}
    return TabularMLP(SPEC.numeric_features, vocab, stats, (8,), 2, SPEC.log_features).eval()


def honest(frame: pd.DataFrame) -> np.ndarray:
    """Risk that rises with amount and online/atm use, and reads nothing else."""
    amount = pd.to_numeric(frame["amount"]).to_numpy(dtype="float64")
    channel = frame["channel"].map({"pos": 0.0, "online": 2.0, "atm": 1.0}).to_numpy()
    return 1 / (1 + np.exp(-(np.log1p(amount) - 6 + channel)))


def test_a_model_that_reads_only_features_passes_invariance() -> None:
    model = tabular_model()
    out = run_behaviour(
        SPEC.behaviour, SPEC, ROWS, lambda f: predict_proba(model, f), threshold=0.5
    )
    by_name = {r.name: r for r in out}
    for name in ("memo_is_ignored", "identifiers_are_ignored"):
        r = by_name[name]
        assert r.kind == "invariance" and r.passed and r.judged, r
        assert r.evidence == {"rows": 400, "rows_moved": 0, "max_abs_delta": 0.0}


def test_a_scorer_that_reads_memo_fails_invariance() -> None:
    model = tabular_model()

    def leaky(frame: pd.DataFrame) -> np.ndarray:
        # The model behind a wrapper that lets the free-text memo nudge the score.
        base = predict_proba(model, frame)
        return base + 0.05 * frame["memo"].fillna("").str.len().to_numpy() / 20

    out = {r.name: r for r in run_behaviour(SPEC.behaviour, SPEC, ROWS, leaky, 0.5)}
    memo = out["memo_is_ignored"]
    assert not memo.passed and memo.judged and memo.severity == "block"
    assert memo.evidence["rows_moved"] > 100 and memo.evidence["max_abs_delta"] > 0.01
    assert "perturbing memo moved" in memo.detail
    assert out["identifiers_are_ignored"].passed  # ids still ignored


def test_directional_expectations_pass_and_fail_by_share() -> None:
    ok = {r.name: r for r in run_behaviour(SPEC.behaviour, SPEC, ROWS, honest, 0.5)}
    amount = ok["larger_amount_does_not_lower_risk"]
    assert amount.passed and amount.evidence["share"] == 1.0
    online = ok["online_is_not_safer_than_pos"]
    assert online.passed
    assert online.evidence["rows"] == int((ROWS["channel"] == "pos").sum())  # only pos rows

    def inverted(frame: pd.DataFrame) -> np.ndarray:
        return 1 - honest(frame)

    bad = {r.name: r for r in run_behaviour(SPEC.behaviour, SPEC, ROWS, inverted, 0.5)}
    amount = bad["larger_amount_does_not_lower_risk"]
    assert not amount.passed and amount.evidence["share"] < 0.9
    assert "required 90%" in amount.detail


def test_a_directional_test_with_no_matching_rows_is_not_judged() -> None:
    no_pos = ROWS[ROWS["channel"] != "pos"]
    out = {r.name: r for r in run_behaviour(SPEC.behaviour, SPEC, no_pos, honest, 0.5)}
    r = out["online_is_not_safer_than_pos"]
    assert not r.judged and not r.passed and "no test row matches channel=pos" in r.detail


def test_minimum_functionality_cases() -> None:
    out = {r.name: r for r in run_behaviour(SPEC.behaviour, SPEC, ROWS, honest, 0.5)}
    assert out["obvious_fraud_outranks_everyday_purchase"].passed
    assert out["obvious_fraud_is_flagged"].evidence["threshold"] == 0.2  # declared in the spec
    assert out["everyday_purchase_is_not_flagged"].passed

    def flat(frame: pd.DataFrame) -> np.ndarray:
        return np.full(len(frame), 0.3)

    flat_out = {r.name: r for r in run_behaviour(SPEC.behaviour, SPEC, ROWS, flat, 0.5)}
    ranking = flat_out["obvious_fraud_outranks_everyday_purchase"]
    assert not ranking.passed and "expected obvious_fraud higher" in ranking.detail
    assert flat_out["obvious_fraud_is_flagged"].passed  # 0.3 >= 0.2
    assert flat_out["everyday_purchase_is_not_flagged"].passed  # 0.3 < 0.5


def test_results_are_deterministic_and_severity_defaults_from_config() -> None:
    model = tabular_model()

    def leaky(frame: pd.DataFrame) -> np.ndarray:
        return predict_proba(model, frame) + 0.01 * frame["memo"].isna().to_numpy()

    first = run_behaviour(SPEC.behaviour, SPEC, ROWS, leaky, 0.5, "warn", seed=3)
    again = run_behaviour(SPEC.behaviour, SPEC, ROWS, leaky, 0.5, "warn", seed=3)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]
    assert {r.severity for r in first} == {"warn"}


def test_perturbations_stay_in_the_declared_range() -> None:
    rng = np.random.default_rng(0)
    spec = SPEC.behaviour
    assert spec is not None
    scaled = perturb(ROWS, spec.directional[0].perturb, SPEC, rng)
    assert scaled["amount"].max() <= 50000.0
    assert (scaled["amount"] >= ROWS["amount"]).all()
    hour = parse_spec(
        {
            **_raw(),
            "behaviour": {
                "invariance": [{"name": "late", "perturb": {"hour": {"add": 30}}}],
            },
        }
    ).behaviour
    assert hour is not None
    moved = perturb(ROWS, hour.invariance[0].perturb, SPEC, rng)
    assert moved["hour"].max() == 23 and moved["hour"].dtype == ROWS["hour"].dtype


def _raw() -> dict:
    return {
        "name": "t",
        "key": "transaction_id",
        "label": "is_fraud",
        "columns": {
            "transaction_id": {"type": "string"},
            "memo": {"type": "string", "nullable": True},
            "hour": {"type": "int", "min": 0, "max": 23, "feature": True},
            "channel": {"type": "category", "values": ["pos", "online"], "feature": True},
            "is_fraud": {"type": "int", "values": [0, 1]},
        },
    }


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ({"invariance": [{"perturb": {"memo": {"set": "x"}}}]}, "needs a 'name'"),
        ({"invariance": [{"name": "a", "perturb": {"nope": {"set": 1}}}]}, "no column 'nope'"),
        ({"invariance": [{"name": "a", "perturb": {"memo": {"scale": 2}}}]}, "numeric column"),
        ({"invariance": [{"name": "a", "perturb": {"memo": {"squash": 2}}}]}, "must be one of"),
        (
            {
                "directional": [
                    {"name": "d", "perturb": {"channel": {"set": "mail"}}, "expect": "not_lower"}
                ]
            },
            "'mail' is not a declared value",
        ),
        (
            {
                "directional": [
                    {"name": "d", "perturb": {"hour": {"add": 1}}, "expect": "up"},
                ]
            },
            "expect must be 'not_lower' or 'not_higher'",
        ),
        (
            {
                "directional": [
                    {
                        "name": "d",
                        "perturb": {"hour": {"add": 1}},
                        "expect": "not_lower",
                        "min_share": 1.5,
                    }
                ]
            },
            "min_share must lie in",
        ),
        ({"cases": {"c": {"hour": 3}}}, "lacks features \\['channel'\\]"),
        (
            {"minimum_functionality": [{"name": "m", "case": "ghost", "expect": "above"}]},
            "'ghost' is not a case",
        ),
        (
            {
                "invariance": [
                    {"name": "a", "perturb": {"memo": {"set": "x"}}},
                    {"name": "a", "perturb": {"memo": {"set": "y"}}},
                ]
            },
            "declared twice",
        ),
        (
            {"invariance": [{"name": "a", "perturb": {"memo": {"set": "x"}}, "severity": "x"}]},
            "severity must be",
        ),
        ({"invariants": []}, "unknown behaviour section"),
    ],
)
def test_malformed_behaviour_sections_name_the_fault(behaviour: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({**_raw(), "behaviour": behaviour}, source="t.yaml")


def test_packaged_specs_declare_behaviour_outside_the_data_version() -> None:
    for name in ("transactions", "breast_cancer"):
        spec = load_spec(name)
        assert spec.behaviour is not None
        kinds = (spec.behaviour.invariance, spec.behaviour.directional)
        assert all(kinds) and spec.behaviour.minimum_functionality
    raw = _raw()
    with_tests = parse_spec(
        {**raw, "behaviour": {"invariance": [{"name": "a", "perturb": {"memo": {"set": "x"}}}]}}
    )
    assert with_tests.fingerprint() == parse_spec(raw).fingerprint()
