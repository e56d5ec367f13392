"""What the served pair (candidate on the canary label, the stable version) is expected to do on
the same inputs: evaluation's expected difference (``pipelines/evaluate/expected.py``), read
from the candidate's evaluation report, or measured afresh on the candidate's held-out rows when
that evaluation was against another champion than the version serving as stable now (a version
registered by hand, or a champion that changed after evaluation)."""

from __future__ import annotations

import json
import logging
from typing import Any

from pipelines.config import Settings
from pipelines.data import layout
from pipelines.evaluate.expected import expected_difference
from pipelines.evaluate.metrics import jsonable
from pipelines.registry import Registry
from pipelines.store import open_store

log = logging.getLogger(__name__)


def published(settings: Settings, version: str) -> dict[str, Any] | None:
    """The expected difference the version's evaluation published (None: none recorded)."""
    reg, store = Registry(settings.mlflow), open_store(settings.store)
    key = f"{layout.evaluation(reg.version_run_id(version))}/report.json"
    if not store.exists(key):
        return None
    return json.loads(store.read_text(key)).get("expected_difference")


def expectation(settings: Settings, version: str, stable: str) -> dict[str, Any]:
    """The expected difference of ``version`` against ``stable``, with its ``source``."""
    found = published(settings, version)
    if found and found.get("champion_version") == str(stable):
        return {**found, "source": "evaluation"}
    from pipelines.evaluate.run import load_run_model
    from pipelines.evaluate.threshold import version_threshold
    from pipelines.serving.rollout import held_out
    from pipelines.train.model import predict_proba

    why = (
        f"evaluated against v{found['champion_version']}"
        if found
        else "its evaluation published none"
    )
    log.info(
        "expected difference of version %s against stable v%s measured now (%s)",
        version,
        stable,
        why,
    )
    _, _, test, candidate = held_out(settings, version)
    reg, fallback = Registry(settings.mlflow), settings.evaluate.threshold
    champion = load_run_model(reg, reg.version_run_id(stable))  # its model only, not its rows
    out = expected_difference(
        predict_proba(candidate, test),
        predict_proba(champion, test),
        version_threshold(reg, version, fallback),
        version_threshold(reg, stable, fallback),
        str(stable),
    )
    # Plain JSON, as the report holds it (a NaN rank correlation becomes None).
    return dict(jsonable({**out, "source": f"measured at rollout ({why})"}))
