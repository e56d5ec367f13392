"""The data gate's outcomes: one check's, whatever computed it (Great Expectations, the streaming
statistics, the partition's interval), and the partition's summary that the report, the audit
trail and the task log hold. Light on purpose: the DAG and the CLI import it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CheckResult:
    check: str
    column: str | None
    severity: str  # block | warn
    success: bool
    detail: str = ""
    examples: list[Any] = field(default_factory=list)


class ValidationBlocked(RuntimeError):
    """The batch failed a blocking check; it has been quarantined."""

    def __init__(self, summary: ValidationSummary):
        self.summary = summary
        super().__init__(summary.message())


@dataclass
class ValidationSummary:
    dataset: str
    date: str
    rows: int
    status: str  # accepted | warned | blocked
    checks: list[CheckResult]
    drift: dict[str, dict[str, float]]
    report_uri: str = ""
    quarantine_uri: str | None = None
    batches: int = 0  # record batches read

    @property
    def accepted(self) -> bool:
        return self.status != "blocked"

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def message(self) -> str:
        lines = [f"{self.dataset} {self.date}: {self.status.upper()} ({self.rows} rows)"]
        for c in self.failures:
            col = f" column={c.column}" if c.column else ""
            ex = f" examples={c.examples[:5]}" if c.examples else ""
            lines.append(f"  [{c.severity}] {c.check}{col}: {c.detail}{ex}")
        if self.quarantine_uri:
            lines.append(f"  batch moved to {self.quarantine_uri}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accepted"] = self.accepted
        return d
