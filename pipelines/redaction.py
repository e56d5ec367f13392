"""Keep configured secrets out of every log record of the process, third-party ones included.

Libraries log what they send at DEBUG (botocore prints each signed request, access key id and
all), so :func:`protect` registers the values and a log-record factory replaces them with
``***`` as each record is created, before any handler, filter or capture sees it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import quote

MASK = "***"
MIN_LENGTH = 4  # shorter values would blank out ordinary words; they are no secrets anyway

_values: frozenset[str] = frozenset()
_lock = threading.Lock()
_previous_factory: Any = None


def redact(text: str) -> str:
    """``text`` with every registered value (and its URL-quoted form) replaced by ``***``."""
    for value in sorted((v for v in _values if v in text), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def _make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record: logging.LogRecord = _previous_factory(*args, **kwargs)
    values = _values
    if not values:
        return record
    try:
        message = record.getMessage()
    except (TypeError, ValueError, KeyError):  # a malformed call: logging reports it itself
        return record
    if any(v in message for v in values):
        record.msg, record.args = redact(message), None
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        if any(v in text for v in values):
            record.exc_text = redact(text)  # handlers print exc_text instead of re-formatting
    return record


def protect(*values: str | None) -> None:
    """Register secret values; from now on no log record of this process contains them."""
    global _values, _previous_factory
    new = {f for v in values if v and len(v) >= MIN_LENGTH for f in (v, quote(v, safe=""))}
    if new <= _values:
        return
    with _lock:
        _values = _values | new
        if _previous_factory is None:
            _previous_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_make_record)
