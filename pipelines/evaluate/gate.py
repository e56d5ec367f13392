"""The blessing gate: rules from config applied to an evaluation; the verdict says why."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipelines.config import EvaluateSettings


@dataclass
class Rule:
    name: str
    passed: bool
    detail: str


@dataclass
class Blessing:
    blessed: bool
    rules: list[Rule]
    override: str | None = None
    override_reason: str | None = None

    def reasons(self) -> list[str]:
        return [f"{'PASS' if r.passed else 'FAIL'} {r.name}: {r.detail}" for r in self.rules]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bless(
    candidate: dict[str, float],
    deltas: dict[str, dict[str, float]] | None,
    cfg: EvaluateSettings,
    force: str | None = None,
    reason: str | None = None,
) -> Blessing:
    """Apply the floors and the regression limit; ``force`` ('bless'|'reject') overrides."""
    auc = candidate.get("roc_auc", float("nan"))
    rules = [Rule("min_auc", auc >= cfg.min_auc, f"ROC-AUC {auc:.4f} vs floor {cfg.min_auc}")]
    if deltas is None:
        rules.append(Rule("no_regression", True, "no champion yet: first model"))
    else:
        d = deltas["roc_auc"]
        ok = d["ci_low"] >= -cfg.max_auc_regression
        rules.append(
            Rule(
                "no_regression",
                ok,
                f"AUC delta {d['delta']:+.4f}, 95% CI [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]; "
                f"the lower bound may not fall below -{cfg.max_auc_regression}",
            )
        )
    blessed = all(r.passed for r in rules)
    if force is not None:
        if force not in ("bless", "reject"):
            raise ValueError(f"force must be 'bless' or 'reject', got {force!r}")
        if not reason:
            raise ValueError("A forced blessing or rejection needs a reason.")
        blessed = force == "bless"
    return Blessing(blessed, rules, force, reason)
