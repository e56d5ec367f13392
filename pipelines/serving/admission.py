"""Whether a registered model version enters the roll-out: a decision that carries its reasons,
as the evaluation gate's blessing does, so the task log and the run report say why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RolloutDecision:
    roll_out: bool
    reasons: tuple[str, ...]
    """One line per check, passing or not, in the order they were made."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}


def decide_rollout(
    registered: dict[str, Any], *, backfill: bool, skip_rollout: bool
) -> RolloutDecision:
    """Roll out only a newly registered version trained on data at least as new as the
    champion's, outside backfills and unless the run asked to register only.

    ``registered`` is the register stage's result (``model_version``, ``is_champion``,
    ``newer_than_champion``, ``data_date``, ``champion_data_date``)."""
    checks: list[tuple[bool, str]] = []
    version = registered.get("model_version")
    checks.append(
        (version is not None, f"registered as version {version}")
        if version is not None
        else (False, "not registered: the evaluation did not bless the run")
    )
    if version is not None:
        champion_date = registered.get("champion_data_date")
        data_date = registered.get("data_date")
        if registered.get("is_champion"):
            checks.append(
                (False, f"version {version} already serves as champion: nothing to roll out")
            )
        elif champion_date is None:
            checks.append((True, "no champion yet: first deployment"))
        elif registered.get("newer_than_champion"):
            checks.append(
                (True, f"trained on {data_date}, not older than the champion's {champion_date}")
            )
        else:
            checks.append(
                (False, f"trained on {data_date}, older than the champion's {champion_date}")
            )
    checks.append(
        (False, "a backfill registers history and never rolls out")
        if backfill
        else (True, "not a backfill")
    )
    checks.append(
        (False, "the run's skip_rollout param asks to register only")
        if skip_rollout
        else (True, "skip_rollout not set")
    )
    ok = all(passed for passed, _ in checks)
    return RolloutDecision(
        roll_out=ok, reasons=tuple(f"{'ok' if p else 'NO'}: {why}" for p, why in checks)
    )
