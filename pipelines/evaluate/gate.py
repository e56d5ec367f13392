"""The blessing gate: rules from config applied to an evaluation; the verdict says why.

Rules: the overall AUC floor, no regression vs the champion (CI lower bound), per-slice floors
and regressions, and the dataset's behavioural tests. A rule blocks when it was judged, failed
and has severity ``block``; ``warn`` failures and slices too small to judge are reported only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.config import EvaluateSettings

if TYPE_CHECKING:
    from pipelines.evaluate.behaviour import BehaviourResult

SliceMetrics = dict[str, dict[str, dict[str, float]]]


@dataclass
class Rule:
    name: str
    passed: bool
    detail: str
    severity: str = "block"
    """'block' (a failure rejects the candidate) or 'warn' (reported only)."""
    judged: bool = True
    """False when the evidence was too thin to judge (a small slice): never counted as a pass."""
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> bool:
        return self.judged and not self.passed and self.severity == "block"

    @property
    def verdict(self) -> str:
        if not self.judged:
            return "NOT JUDGED"
        if self.passed:
            return "PASS"
        return "FAIL" if self.severity == "block" else "WARN"

    def reason(self) -> str:
        return f"{self.verdict} {self.name}: {self.detail}"


@dataclass
class Blessing:
    blessed: bool
    rules: list[Rule]
    override: str | None = None
    override_reason: str | None = None

    @property
    def gate_passed(self) -> bool:
        """What the rules alone decided, before any override."""
        return not any(r.blocks for r in self.rules)

    @property
    def failed(self) -> list[str]:
        """Names of the rules that block the candidate."""
        return [r.name for r in self.rules if r.blocks]

    def reasons(self) -> list[str]:
        return [r.reason() for r in self.rules]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for rule, d in zip(self.rules, out["rules"], strict=True):
            d["verdict"] = rule.verdict
        out.update(gate_passed=self.gate_passed, failed=self.failed, reasons=self.reasons())
        return out


def slice_key(column: str, value: str) -> str:
    return f"{column}={value}"


def judge_slices(
    slices: SliceMetrics, champion_slices: SliceMetrics | None, cfg: EvaluateSettings
) -> tuple[list[Rule], list[dict[str, Any]]]:
    """Rules for slices with a floor (or a regression limit), and a row per slice for the report.

    A slice is judged only with ``slice_min_rows`` rows and ``slice_min_class_rows`` of each
    class; a smaller one with a floor yields a NOT JUDGED rule, never a silent pass."""
    rules: list[Rule] = []
    table: list[dict[str, Any]] = []
    seen: set[str] = set()
    for column, values in slices.items():
        for value, m in values.items():
            key = slice_key(column, value)
            seen.add(key)
            rows, pos = int(m.get("rows", 0)), int(m.get("positives", 0))
            auc = m.get("roc_auc")
            floor = cfg.slice_min_auc_by_slice.get(key, cfg.slice_min_auc)
            champ = ((champion_slices or {}).get(column) or {}).get(value) or {}
            champ_auc = champ.get("roc_auc")
            regression = cfg.slice_max_auc_regression is not None and champ_auc is not None
            why_not = _not_judgeable(rows, pos, auc, cfg)
            row: dict[str, Any] = {
                "slice": key,
                "rows": rows,
                "positives": pos,
                "roc_auc": auc,
                "champion_roc_auc": champ_auc,
                "floor": floor,
                "status": "no_floor",
                "reason": why_not or "",
            }
            table.append(row)
            if floor is None and not regression:
                continue
            evidence = {"slice": key, "rows": rows, "positives": pos, "roc_auc": auc}
            if why_not:
                row["status"] = "not_judged"
                names = (["slice_min_auc"] if floor is not None else []) + (
                    ["slice_regression"] if regression else []
                )
                for name in names:
                    rules.append(
                        Rule(
                            f"{name}[{key}]",
                            False,
                            f"{key} not judged: {why_not}",
                            severity="warn",
                            judged=False,
                            evidence={**evidence, "floor": floor},
                        )
                    )
                continue
            assert auc is not None  # _not_judgeable checked it
            ok = True
            if floor is not None:
                passed = auc >= floor
                ok &= passed
                rules.append(
                    Rule(
                        f"slice_min_auc[{key}]",
                        passed,
                        f"{key}: ROC-AUC {auc:.4f} vs floor {floor} ({rows} rows, {pos} positives)",
                        evidence={**evidence, "floor": floor},
                    )
                )
            if regression:
                assert champ_auc is not None and cfg.slice_max_auc_regression is not None
                delta = auc - champ_auc
                passed = delta >= -cfg.slice_max_auc_regression
                ok &= passed
                row["delta"] = delta
                rules.append(
                    Rule(
                        f"slice_regression[{key}]",
                        passed,
                        f"{key}: ROC-AUC {auc:.4f} vs champion {champ_auc:.4f} "
                        f"(delta {delta:+.4f}, may not fall below "
                        f"-{cfg.slice_max_auc_regression}; {rows} rows, {pos} positives)",
                        evidence={**evidence, "champion_roc_auc": champ_auc, "delta": delta},
                    )
                )
            row["status"] = "passed" if ok else "failed"
    for key in sorted(set(cfg.slice_min_auc_by_slice) - seen):
        rules.append(
            Rule(
                f"slice_min_auc[{key}]",
                False,
                f"{key} has a floor but is not a slice of the test split "
                f"(slices: {', '.join(sorted(seen)) or 'none'})",
                severity="warn",
                judged=False,
                evidence={"slice": key, "floor": cfg.slice_min_auc_by_slice[key]},
            )
        )
    return rules, table


def _not_judgeable(rows: int, pos: int, auc: float | None, cfg: EvaluateSettings) -> str | None:
    neg = rows - pos
    if min(pos, neg) == 0 or auc is None:
        return f"a single class ({rows} rows, {pos} positives)"
    if rows < cfg.slice_min_rows:
        return f"{rows} rows < slice_min_rows {cfg.slice_min_rows}"
    if min(pos, neg) < cfg.slice_min_class_rows:
        return (
            f"{min(pos, neg)} rows of the rarer class ({pos} positives of {rows}) "
            f"< slice_min_class_rows {cfg.slice_min_class_rows}"
        )
    return None


def behaviour_rules(results: Sequence[BehaviourResult]) -> list[Rule]:
    return [
        Rule(
            f"behaviour.{r.kind}.{r.name}",
            r.passed,
            r.detail,
            severity=r.severity,
            judged=r.judged,
            evidence=r.evidence,
        )
        for r in results
    ]


def bless(
    candidate: dict[str, float],
    deltas: dict[str, dict[str, float]] | None,
    cfg: EvaluateSettings,
    force: str | None = None,
    reason: str | None = None,
    *,
    slices: SliceMetrics | None = None,
    champion_slices: SliceMetrics | None = None,
    behaviour: Sequence[BehaviourResult] = (),
) -> Blessing:
    """Apply the floors, the regression limit, slice rules and behavioural tests;
    ``force`` ('bless'|'reject', with a reason) overrides the verdict, never the rules."""
    if force is not None:
        if force not in ("bless", "reject"):
            raise ValueError(f"force must be 'bless' or 'reject', got {force!r}")
        if not reason:
            raise ValueError("A forced blessing or rejection needs a reason.")
    auc = candidate.get("roc_auc", float("nan"))
    rules = [
        Rule(
            "min_auc",
            auc >= cfg.min_auc,
            f"ROC-AUC {auc:.4f} vs floor {cfg.min_auc}",
            evidence={"roc_auc": auc, "floor": cfg.min_auc},
        )
    ]
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
                evidence={k: d[k] for k in ("delta", "ci_low", "ci_high")},
            )
        )
    if slices:
        rules += judge_slices(slices, champion_slices, cfg)[0]
    rules += behaviour_rules(behaviour)
    blessed = not any(r.blocks for r in rules)
    if force is not None:
        blessed = force == "bless"
    return Blessing(blessed, rules, force, reason)
