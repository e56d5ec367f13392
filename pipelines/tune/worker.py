"""The tuning worker process: reads its job from the arguments and the storage URL from the
environment, pulls trials until the study's budget is spent, prints one result line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from pipelines.redaction import protect

RESULT_MARK = "MLOPS_TUNE_RESULT "


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("optuna", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipelines.config import ConfigError
    from pipelines.tune.job import parse_job
    from pipelines.tune.storage import STORAGE_ENV, StorageUnavailable
    from pipelines.tune.study import run_worker

    try:
        job = parse_job(argv)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    url = os.environ.get(STORAGE_ENV, "")
    if not url:
        print(f"Tuning worker {job.worker}: {STORAGE_ENV} is not set.", file=sys.stderr)
        return 2
    protect(url)
    # SIGTERM (`mlops tune` interrupted, a pod deleted) unwinds like an error: the running
    # trial is told FAIL and its MLflow run closed, instead of waiting out the grace period.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        out = run_worker(job, url)
    except StorageUnavailable as exc:
        print(f"Tuning worker {job.worker}: {exc}", file=sys.stderr)
        return 3
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0
