"""The roll-out decision: every check is a reason, and any failed check stops the roll-out."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines.serving.admission import decide_rollout

NEW = {
    "model_version": "3",
    "is_champion": False,
    "newer_than_champion": True,
    "data_date": "2026-11-03",
    "champion_data_date": "2026-11-02",
}


def test_a_new_version_on_newer_data_rolls_out_and_says_why() -> None:
    d = decide_rollout(NEW, backfill=False, skip_rollout=False)
    assert d.roll_out is True
    assert d.reasons == (
        "ok: registered as version 3",
        "ok: trained on 2026-11-03, not older than the champion's 2026-11-02",
        "ok: not a backfill",
        "ok: skip_rollout not set",
    )


def test_the_first_deployment_rolls_out() -> None:
    first = {**NEW, "champion_data_date": None}
    d = decide_rollout(first, backfill=False, skip_rollout=False)
    assert d.roll_out and "ok: no champion yet: first deployment" in d.reasons


@pytest.mark.parametrize(
    ("change", "backfill", "skip", "reason"),
    [
        ({"model_version": None}, False, False, "NO: not registered: the evaluation did not bless"),
        ({"is_champion": True}, False, False, "NO: version 3 already serves as champion"),
        (
            {"newer_than_champion": False, "data_date": "2026-10-30"},
            False,
            False,
            "NO: trained on 2026-10-30, older than the champion's 2026-11-02",
        ),
        ({}, True, False, "NO: a backfill registers history and never rolls out"),
        ({}, False, True, "NO: the run's skip_rollout param asks to register only"),
    ],
)
def test_any_failed_check_stops_the_roll_out_and_is_named(
    change: dict[str, Any], backfill: bool, skip: bool, reason: str
) -> None:
    d = decide_rollout({**NEW, **change}, backfill=backfill, skip_rollout=skip)
    assert d.roll_out is False
    assert [r for r in d.reasons if r.startswith(reason)], d.reasons
    assert d.to_dict()["reasons"] == list(d.reasons)


def test_an_analysis_without_a_verdict_names_how_far_it_got_and_why_it_ended() -> None:
    """The rollback reason when every monitor_canary attempt failed: never a bare "failed"."""
    from pipelines.stages import undecided_reason

    failure = {"try_number": 4, "error": "LeaseLost: the serving lease expired"}
    reason = undecided_reason({"windows": [{}, {}, {}]}, failure)
    assert reason == (
        "the canary analysis reached no verdict after 3 judged window(s); monitor_canary "
        "attempt 4 failed: LeaseLost: the serving lease expired"
    )
    assert undecided_reason({}, None).endswith(
        "monitor_canary did not finish (no failure was recorded)"
    )
