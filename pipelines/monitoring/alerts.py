"""Where a monitoring alert goes: one ERROR log line each (what a log-based on-call filter keys
on), and, when ``monitoring.alert_webhook`` is set, a JSON POST per alert to that incoming
webhook (``{"text": <the line>, "alert": {hour, champion, reason, evidence}}``, the shape Slack
and Teams webhooks and most receivers take). A webhook that does not answer 2xx fails the task,
so Airflow retries it and its failure callback fires; the URL (it usually holds a token) is
never logged."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import requests

from pipelines.config import Settings

log = logging.getLogger(__name__)


class AlertError(RuntimeError):
    """An alert could not be delivered."""


class Notifier(Protocol):
    def send(self, line: str, alert: dict[str, Any]) -> None: ...


class WebhookNotifier:
    def __init__(self, url: str, timeout: float = 10.0):
        self.url, self.timeout = url, timeout

    def send(self, line: str, alert: dict[str, Any]) -> None:
        try:
            r = requests.post(self.url, json={"text": line, "alert": alert}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise AlertError(
                f"The alert webhook (monitoring.alert_webhook) did not answer: "
                f"{type(exc).__name__}."
            ) from None
        if not 200 <= r.status_code < 300:
            raise AlertError(
                f"The alert webhook (monitoring.alert_webhook) answered {r.status_code}."
            )


def notifiers(settings: Settings) -> list[Notifier]:
    """The configured notifiers (the composition root of alerting)."""
    url = settings.monitoring.alert_webhook
    return [WebhookNotifier(url.get_secret_value())] if url is not None else []


def send_alerts(decision: dict[str, Any], targets: list[Notifier]) -> list[str]:
    """One ERROR line per alert of the decision, then each to every notifier; the lines."""
    lines = []
    for a in decision["actions"]:
        if a["kind"] != "alert":
            continue
        line = (
            f"MONITORING ALERT {decision['hour']} (champion v{decision.get('champion')}): "
            f"{a['reason']}"
        )
        log.error(line)
        lines.append(line)
        alert = {
            "hour": decision["hour"],
            "champion": decision.get("champion"),
            "reason": a["reason"],
            "evidence": a.get("evidence") or {},
        }
        for target in targets:
            target.send(line, alert)
    return lines
