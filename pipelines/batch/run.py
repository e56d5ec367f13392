"""``mlops score``: plan, score the chunks in ``workers`` local processes, publish.

The DAG runs the same three steps as tasks (a mapped task, or a pod, per chunk). Here a
worker process loads the runtime once and scores the chunks it is given; every worker is
stopped when the call ends, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from pipelines.batch.plan import ScoringJob
from pipelines.batch.score import plan_scoring, publish, score_chunk
from pipelines.config import Settings

log = logging.getLogger(__name__)


def threads_per_worker(workers: int, configured: int | None = None) -> int:
    """Runtime threads of one worker: the configured number, else this machine's cores shared
    by the workers (two workers on two cores get one thread each, not two)."""
    from pipelines.data.batches import cpu_workers

    if configured:
        return configured
    return max(1, cpu_workers(limit=1024) // max(workers, 1))


_WORKER: dict[str, Any] = {}


def _init_worker(settings: Settings, threads: int) -> None:
    import os

    _WORKER.update(settings=settings, threads=threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the worker's TF start-up chatter


def _score_in_worker(job: dict[str, Any]) -> dict[str, Any]:
    return score_chunk(_WORKER["settings"], ScoringJob.from_dict(job), _WORKER["threads"])


def score(
    settings: Settings,
    date: str,
    version: str | None = None,
    workers: int | None = None,
    dataset: str | None = None,
    sink: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score one day's landing partition and publish it; returns the published summary
    (``published_now`` False when that day's scores by that version already existed)."""
    sink = sink or (lambda line: log.info("%s", line))
    workers = workers or settings.batch.workers
    started = time.perf_counter()
    threads = threads_per_worker(workers, settings.batch.threads)
    # Worker processes start (and import) while this one asks MLflow for the champion.
    pool = _pool(settings, workers, threads) if workers > 1 else None
    try:
        plan = plan_scoring(settings, date, version, dataset)
        jobs = plan["jobs"]
        if not jobs:
            out = publish(settings, plan, [])
            sink(f"already published: {out['manifest_uri']}")
            return out
        sink(f"{len(jobs)} chunks, {workers} worker(s), {threads} runtime thread(s) each")
        if pool is None:
            parts = [score_chunk(settings, ScoringJob.from_dict(j), threads) for j in jobs]
        else:
            parts = pool.map(_score_in_worker, jobs, chunksize=1)
    finally:  # success, failure or Ctrl-C: no worker outlives the call
        if pool is not None:
            pool.terminate()
            pool.join()
    out = publish(settings, plan, parts)
    out["workers"] = workers
    out["seconds"] = round(time.perf_counter() - started, 3)
    sink(f"published {out['rows']} rows in {out['parts']} parts: {out['manifest_uri']}")
    return out


def _pool(settings: Settings, workers: int, threads: int) -> Any:
    """Spawned processes (not forked: TensorFlow and the store's clients hold threads); the
    caller terminates them on any exit."""
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(workers, initializer=_init_worker, initargs=(settings, threads))
