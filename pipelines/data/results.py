"""One check's outcome, whatever computed it (Great Expectations, the streaming statistics, the
partition's interval): what the validation summary, the report and the audit trail hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckResult:
    check: str
    column: str | None
    severity: str  # block | warn
    success: bool
    detail: str = ""
    examples: list[Any] = field(default_factory=list)
