"""``mlops tune``: the storage (the local PostgreSQL started if needed, stopped after if this
started it), the study and its parent run, W worker processes, then the study's summary."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pipelines.config import Settings
from pipelines.tune.job import TuneJob
from pipelines.tune.storage import STORAGE_ENV, study_storage
from pipelines.tune.study import (
    create_study,
    fail_abandoned,
    finish_study,
    study_name,
    tuning_mlflow,
)

log = logging.getLogger(__name__)


class WorkersFailed(RuntimeError):
    """Every worker exited non-zero; carries the first one's last lines."""


def default_study_name(settings: Settings, manifest_uri: str, key: str | None = None) -> str:
    """``<dataset>-<data version>-<hash of key>``; no key (the CLI): a new study each call."""
    from pipelines.data.shard import load_manifest
    from pipelines.store import open_store

    m = load_manifest(open_store(settings.store), manifest_uri)
    return study_name(m.data["dataset"], m.data_version, key or f"{time.time_ns()}")


def tune(
    settings: Settings,
    manifest_uri: str,
    trials: int | None = None,
    workers: int | None = None,
    study: str | None = None,
    sink: Callable[[str], None] | None = None,
    on_start: Callable[[list[int]], None] | None = None,
    timeout_s: float = 6 * 3600,
) -> dict[str, Any]:
    """Run one study with ``workers`` local worker processes until ``trials`` trials ran to the
    end or were pruned; returns the study's summary (best params, counts, parent run id).
    ``on_start`` receives the workers' pids (tests kill one)."""
    trials = trials or settings.tuning.trials
    workers = workers or settings.tuning.workers
    sink = sink or (lambda line: log.info("%s", line))
    with study_storage(settings) as storage:
        name = study or default_study_name(settings, manifest_uri)
        created = create_study(settings, storage.url, manifest_uri, name, trials, workers)
        jobs = [
            TuneJob.for_worker(
                settings, name, manifest_uri, created["parent_run_id"], i, colocated=workers
            )
            for i in range(workers)
        ]
        pids: set[int] = set()

        def started(started_pids: list[int]) -> None:
            pids.update(started_pids)
            if on_start is not None:
                on_start(started_pids)

        try:
            codes = run_workers(settings, storage.url, jobs, sink, started, timeout_s)
        except BaseException:
            from pipelines.registry import Registry

            # The workers are stopped by now; what one of them left RUNNING is failed here.
            fail_abandoned(settings, storage.url, name, pids)
            Registry(tuning_mlflow(settings)).end_run(created["parent_run_id"], ok=False)
            raise
        out = finish_study(settings, storage.url, name)
        out["worker_exit_codes"] = codes
        out["storage_started_here"] = storage.owned
        return out


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if `mlops tune` dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pump(index: int, stream: Any, tail: deque[str], sink: Callable[[str], None]) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        tail.append(line)
        sink(f"[worker {index}] {line}")
    stream.close()


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_workers(
    settings: Settings,
    url: str,
    jobs: list[TuneJob],
    sink: Callable[[str], None],
    on_start: Callable[[list[int]], None] | None = None,
    timeout_s: float = 6 * 3600,
) -> list[int]:
    """Start one ``python -m pipelines.tune`` per job (own process group, secrets in the
    environment only) and wait for all; none outlives the call. Returns their exit codes;
    :class:`WorkersFailed` if every one failed (a worker that died is covered by the others
    through the study's heartbeats, so one failure alone is not the study's)."""
    from pipelines.train.job import secret_env

    env = {
        **os.environ,
        **secret_env(settings),
        STORAGE_ENV: url,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    procs: list[subprocess.Popen[str]] = []
    tails: list[deque[str]] = []
    threads: list[threading.Thread] = []
    try:
        for job in jobs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipelines.tune", *job.argv()],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            tail: deque[str] = deque(maxlen=20)
            t = threading.Thread(
                target=_pump, args=(job.worker, proc.stdout, tail, sink), daemon=True
            )
            t.start()
            procs.append(proc)
            tails.append(tail)
            threads.append(t)
        if on_start is not None:
            on_start([p.pid for p in procs])
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise WorkersFailed(f"Tuning workers did not finish within {timeout_s:.0f} s.")
            time.sleep(0.2)
        for t in threads:
            t.join(timeout=10)
    finally:
        _stop(procs)
    codes = [int(p.returncode) for p in procs]
    if all(codes):
        first = next(i for i, c in enumerate(codes) if c)
        last = [line for line in tails[first] if line.strip()][-3:]
        raise WorkersFailed(
            f"All {len(codes)} tuning workers failed; worker {first} exited with code "
            f"{codes[first]}: " + " | ".join(last)
        )
    return codes
