"""One Optuna study shared by W workers: create it (with its parent MLflow run), let each worker
pull trials until the budget is spent, then summarise it (best params, plots) on the parent.

The budget is N trials that ran to the end or were pruned. A worker takes the next trial under a
per-study database lock, after failing trials whose worker stopped beating (they are re-queued
as WAITING copies, which the next worker takes first), so the study never holds more than N
live trials, and a killed worker's trial is retried by another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import ConfigError, Settings
from pipelines.postgres import masked
from pipelines.tune.job import TuneJob
from pipelines.tune.storage import budget_lock, open_storage

if TYPE_CHECKING:
    import optuna

    from pipelines.config import MlflowSettings, TrainSettings, TuningSettings
    from pipelines.registry import Registry

log = logging.getLogger(__name__)

ATTR = "mlops."  # study and trial user attributes the project writes


class TuningIncomplete(RuntimeError):
    """The workers ended before the study's budget was spent."""


class NoStudy(ConfigError):
    """``train.params_from = tuning`` but no finished study is there to take params from."""


def study_name(dataset: str, data_version: str, key: str) -> str:
    """A study per data set and tuning run (``key``: a DAG run id, or a timestamp)."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{dataset}-{data_version[:12]}-{digest}"


def tuning_mlflow(settings: Settings) -> MlflowSettings:
    """The MLflow settings of tuning runs: their own experiment, beside the training runs."""
    return settings.mlflow.model_copy(update={"experiment": settings.tuning.experiment})


def sampler(t: TuningSettings, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded per worker: workers with one seed would propose the same points in parallel."""
    import optuna

    seed = t.seed * 1000 + worker
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial counts as a bad result, so parallel workers spread out.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=t.startup_trials, constant_liar=True, multivariate=True
    )


def pruner(t: TuningSettings, max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    if t.pruner == "none":
        return optuna.pruners.NopPruner()
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    return optuna.pruners.MedianPruner(
        n_startup_trials=t.prune_startup_trials, n_warmup_steps=t.warmup_epochs
    )


def max_epochs(t: TuningSettings, train: TrainSettings) -> int:
    """The most epochs a trial can run (Hyperband's max resource)."""
    p = t.space.get("epochs")
    return int(p.high) if p is not None and p.high is not None else train.epochs


def _load(
    t: TuningSettings,
    train: TrainSettings,
    url: str,
    name: str,
    worker: int = 0,
    storage: optuna.storages.RDBStorage | None = None,
) -> optuna.Study:
    import optuna

    return optuna.load_study(
        study_name=name,
        storage=storage or open_storage(t, url),
        sampler=sampler(t, worker),
        pruner=pruner(t, max_epochs(t, train)),
    )


# -- create ------------------------------------------------------------------------------------
def create_study(
    settings: Settings, url: str, manifest_uri: str, name: str, trials: int, workers: int
) -> dict[str, Any]:
    """Create the study (or find it: a rerun with the same name continues it) and its parent
    MLflow run; returns the study name, parent run id and the storage (masked)."""
    import optuna

    from pipelines.data.shard import load_manifest
    from pipelines.registry import Registry
    from pipelines.store import open_store

    manifest = load_manifest(open_store(settings.store), manifest_uri)
    study = optuna.create_study(
        storage=open_storage(settings.tuning, url),
        study_name=name,
        direction="minimize",
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if f"{ATTR}parent_run_id" in attrs:
        parent = str(attrs[f"{ATTR}parent_run_id"])
        if int(attrs[f"{ATTR}trials"]) != trials:
            study.set_user_attr(f"{ATTR}trials", trials)
    else:
        reg = Registry(tuning_mlflow(settings))
        parent = reg.create_run(
            f"tune-{name}",
            {
                "study": name,
                "storage": masked(url),
                "manifest_uri": manifest_uri,
                "data_version": manifest.data_version,
                "dataset": manifest.data["dataset"],
                "data_date": manifest.data["date"],
            },
        )
        t = settings.tuning
        reg.log_params(
            parent,
            {
                "trials": trials,
                "workers": workers,
                "sampler": t.sampler,
                "pruner": t.pruner,
                "seed": t.seed,
                "search_space": json.dumps({k: v.model_dump() for k, v in t.space.items()}),
            },
        )
        for key, value in {
            "parent_run_id": parent,
            "trials": trials,
            "dataset": manifest.data["dataset"],
            "data_version": manifest.data_version,
            "manifest_uri": manifest_uri,
            "finished": False,
        }.items():
            study.set_user_attr(f"{ATTR}{key}", value)
    log.info("study %s on %s: %d trials, parent run %s", name, masked(url), trials, parent)
    return {"study": name, "parent_run_id": parent, "storage": masked(url), "trials": trials}


# -- workers -----------------------------------------------------------------------------------
LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


def next_trial(
    study: optuna.Study, budget: int, storage: optuna.storages.RDBStorage
) -> tuple[optuna.Trial | None, int]:
    """Under the study's lock: fail stale trials (re-queueing them), then take a queued trial or
    start a new one while fewer than ``budget`` are live. Returns (trial or None, running)."""
    import optuna

    with budget_lock(storage, study._study_id):
        optuna.storages.fail_stale_trials(study)
        states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        if states["WAITING"] or sum(states[s] for s in LIVE) < budget:
            return study.ask(), states["RUNNING"]
    return None, states["RUNNING"]


def _next_trial_of_this_process(
    study: optuna.Study, budget: int, storage: optuna.storages.RDBStorage
) -> tuple[optuna.Trial | None, int]:
    """``next_trial`` with this host and pid on the trial before a SIGTERM can stop the
    worker: a trial asked for and not yet running its telling would otherwise stay RUNNING
    with nothing naming its dead worker, and ``mlops tune``'s ``fail_abandoned`` (Ctrl-C) could
    not fail it. SIGTERM waits, blocked, until both are written."""
    import signal
    import socket

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        trial, running = next_trial(study, budget, storage)
        if trial is not None:
            trial.set_user_attr(f"{ATTR}host", socket.gethostname())
            trial.set_user_attr(f"{ATTR}pid", os.getpid())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return trial, running


class Heartbeat:
    """Records the trial's heartbeat every ``interval`` s while the trial runs (what Optuna's
    own optimize loop does; workers here use ask/tell to keep the budget exact)."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trial-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a missed beat is retried; the grace period covers a few
                log.warning("heartbeat of trial id %d failed", self.trial_id, exc_info=True)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(colocated: int) -> int:
    """Torch threads per worker: the machine's cores shared by the workers on it, at least 1."""
    return max(1, cores() // max(colocated, 1))


def run_worker(job: TuneJob, url: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Pull and run trials until the study's budget is spent and no other worker's trial is
    still running (a dead one's is retried here); returns this worker's trials."""
    import torch

    from pipelines.tune.trial import TrialRunner

    environ = dict(os.environ if environ is None else environ)
    threads = job.tuning.threads or worker_threads(job.colocated)
    torch.set_num_threads(threads)
    storage = open_storage(job.tuning, url)
    study = _load(job.tuning, job.train, url, job.study, job.worker, storage)
    budget = int(study.user_attrs[f"{ATTR}trials"])
    runner = TrialRunner(job, environ)
    done: list[dict[str, Any]] = []
    log.info("worker %d: study %s, %d torch threads", job.worker, job.study, threads)
    try:
        while True:
            trial, running = _next_trial_of_this_process(study, budget, storage)
            if trial is None:
                if running == 0:
                    break
                time.sleep(job.tuning.poll_s)  # others' trials may still fail and come back
                continue
            with Heartbeat(study._storage, trial._trial_id, job.tuning.heartbeat_s):
                done.append(runner.run(study, trial))
    finally:
        runner.close()
    return {"worker": job.worker, "trials": done, "threads": threads}


# -- finish ------------------------------------------------------------------------------------
def summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial, and the share of planned epochs that pruning saved."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    planned = sum(int(t.user_attrs.get(f"{ATTR}epochs_planned", 0)) for t in finished)
    ran = sum(int(t.user_attrs.get(f"{ATTR}epochs_run", 0)) for t in finished)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: float(t.value or 0.0)) if complete else None
    return {
        "study": study.study_name,
        "states": dict(states),
        "complete": states["COMPLETE"],
        "pruned": states["PRUNED"],
        "failed": states["FAIL"],
        "best_value": float(best.value) if best is not None and best.value is not None else None,
        "best_trial": best.number if best is not None else None,
        "best_params": dict(best.params) if best is not None else None,
        "epochs_planned": planned,
        "epochs_run": ran,
        "pruned_epoch_share": (1 - ran / planned) if planned else 0.0,
    }


def finish_study(settings: Settings, url: str, name: str) -> dict[str, Any]:
    """Summarise the study on its parent MLflow run (best params, counts, plots) and end it;
    :class:`TuningIncomplete` if fewer trials than the budget ran to the end or were pruned."""
    from pipelines.registry import Registry

    study = _load(settings.tuning, settings.train, url, name)
    out = summary(study)
    budget = int(study.user_attrs[f"{ATTR}trials"])
    parent = str(study.user_attrs[f"{ATTR}parent_run_id"])
    reg = Registry(tuning_mlflow(settings))
    _close_orphans(reg, study)
    reg.log_metrics(
        parent,
        {
            "trials_complete": out["complete"],
            "trials_pruned": out["pruned"],
            "trials_failed": out["failed"],
            "pruned_epoch_share": out["pruned_epoch_share"],
            **({"best_val_loss": out["best_value"]} if out["best_value"] is not None else {}),
        },
    )
    ok = out["complete"] + out["pruned"] >= budget and out["best_trial"] is not None
    if out["best_params"] is not None:
        reg.log_params(parent, {f"best_{k}": v for k, v in out["best_params"].items()})
        reg.set_tags(parent, {"best_trial": out["best_trial"]})
        reg.log_bytes(
            parent,
            json.dumps({**out, "storage": masked(url)}, indent=2, default=str).encode(),
            "tuning",
            "best_params.json",
        )
        out["plots"] = _log_plots(reg, parent, study)
    if ok:
        study.set_user_attr(f"{ATTR}finished", True)
        study.set_user_attr(f"{ATTR}best_trial", out["best_trial"])
    reg.end_run(parent, ok=ok)
    out.update({"parent_run_id": parent, "storage": masked(url), "trials": budget})
    if not ok:
        raise TuningIncomplete(
            f"Study {name} on {masked(url)} has {out['complete']} complete and "
            f"{out['pruned']} pruned trials of a budget of {budget} ({out['failed']} failed)."
        )
    return out


def fail_abandoned(settings: Settings, url: str, name: str, pids: set[int]) -> int:
    """After ``mlops tune`` stopped its workers (Ctrl-C, a timeout): a trial still RUNNING on
    one of them (this host, one of ``pids``; killed before it could tell) is told FAIL and its
    MLflow run ended, instead of waiting for the heartbeat grace period. Returns how many."""
    import socket

    from optuna.trial import TrialState

    from pipelines.registry import Registry

    study = _load(settings.tuning, settings.train, url, name)
    host = socket.gethostname()
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(f"{ATTR}host") == host and t.user_attrs.get(f"{ATTR}pid") in pids:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            failed += 1
    if failed:
        _close_orphans(Registry(tuning_mlflow(settings)), study)
    return failed


def _close_orphans(reg: Registry, study: optuna.Study) -> None:
    """A failed trial's MLflow run (its worker died mid-trial) is marked FAILED."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get(f"{ATTR}mlflow_run_id")
        if not run_id:
            continue
        if reg.get_run(run_id).info.status == "RUNNING":
            reg.set_tags(run_id, {"trial_state": "FAIL"})
            reg.end_run(run_id, ok=False)


def _log_plots(reg: Registry, parent: str, study: optuna.Study) -> list[str]:
    """Optimisation history and parameter importances as PNGs on the parent run (importances
    need two complete trials with varied params; a plot that cannot be drawn is skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plot in (
            ("optimization_history", vis.plot_optimization_history),
            ("param_importances", vis.plot_param_importances),
        ):
            try:
                plot(study)
                fig = plt.gcf()  # the plot functions draw on a new current figure
                path = Path(tmp) / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(fig)
            except Exception as exc:  # noqa: BLE001 - a plot is evidence, not a gate
                log.warning("could not draw %s: %s", name, exc)
                continue
            reg.client.log_artifact(parent, str(path), artifact_path="tuning")
            logged.append(f"tuning/{name}.png")
    return logged


# -- best params into training -----------------------------------------------------------------
def find_study(settings: Settings, url: str, dataset: str) -> str:
    """``tuning.study`` if set, else the latest finished study of ``dataset``."""
    import optuna

    if settings.tuning.study:
        return settings.tuning.study
    storage = open_storage(settings.tuning, url)
    finished = [
        s
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.user_attrs.get(f"{ATTR}finished") and s.user_attrs.get(f"{ATTR}dataset") == dataset
    ]
    if not finished:
        raise NoStudy(
            f"train.params_from is 'tuning' but the storage {masked(url)} holds no finished "
            f"study of dataset {dataset!r}; run `mlops tune` first or set tuning.study."
        )
    latest = max(finished, key=lambda s: (s.datetime_start is not None, s.datetime_start))
    return str(latest.study_name)


def best_params(
    settings: Settings, url: str, dataset: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train overrides, provenance tags) from the best trial of the study training uses."""
    import optuna

    from pipelines.tune.space import train_overrides

    name = find_study(settings, url, dataset)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(settings.tuning, url))
    except KeyError:
        raise NoStudy(f"Study {name!r} (tuning.study) is not in {masked(url)}.") from None
    try:
        best = study.best_trial
    except ValueError:
        raise NoStudy(f"Study {name!r} in {masked(url)} has no complete trial yet.") from None
    tags = {
        "params_from": "tuning",
        "tuning_study": name,
        "tuning_trial": best.number,
        "tuning_storage": masked(url),
        "tuning_parent_run": study.user_attrs.get(f"{ATTR}parent_run_id", ""),
        "tuning_trial_run": best.user_attrs.get(f"{ATTR}mlflow_run_id", ""),
        "tuning_best_val_loss": best.value,
    }
    return train_overrides(best.params), tags
