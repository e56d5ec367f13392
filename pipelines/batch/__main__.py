"""``python -m pipelines.batch --job JSON``: score one chunk (a Kubernetes pod per chunk runs
this line; locally the DAG's mapped task calls the same function in its own process)."""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.batch.plan import ScoringJob
from pipelines.batch.score import score_chunk
from pipelines.config import ConfigError, settings

RESULT_MARK = "MLOPS_SCORE_RESULT "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.batch")
    parser.add_argument("--job", required=True, help="one ScoringJob as JSON (from the plan)")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads")
    a = parser.parse_args(argv)
    try:
        job = ScoringJob.from_dict(json.loads(a.job))
    except (ValueError, TypeError, KeyError) as exc:
        print(f"--job is not a scoring job: {exc}", file=sys.stderr)
        return 2
    try:
        s = settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = score_chunk(s, job, a.threads)
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
