"""Personal data: what a PII column must never contain, and masking so reports never repeat it."""

from __future__ import annotations

import re
from typing import Any

# Each kind of personal data and its pattern; a match is replaced by ``<kind>``. E-mails go
# first: an address made of digits must not be half-masked as a card number.
PII_KINDS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    # Separators only between digits, so the space after a number stays in the text.
    "card-number": r"\b\d(?:[ -]?\d){12,18}\b",
}
PII_PATTERNS = list(PII_KINDS.values())
_PII_RE = [(re.compile(pattern), f"<{kind}>") for kind, pattern in PII_KINDS.items()]


def mask_pii(value: Any) -> Any:
    """Mask e-mails and card numbers in text; values that are not text pass unchanged."""
    if not isinstance(value, str):
        return value
    for rx, token in _PII_RE:
        value = rx.sub(token, value)
    return value
