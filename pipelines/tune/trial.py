"""One trial: the real trainer (``pipelines.train.worker.Trainer``) in this process, a world of
one, its settings from the trial's sample, each epoch's validation loss reported to the pruner,
and the whole trial a nested MLflow run under the study's parent run."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from pipelines.tune.job import TuneJob
from pipelines.tune.space import suggest

if TYPE_CHECKING:
    import optuna

    from pipelines.train.job import TrainJob
    from pipelines.train.worker import Trainer

log = logging.getLogger(__name__)

ATTR = "mlops."


class TrialRunner:
    """Runs trials of one worker; holds what they share (store, MLflow, the val split, a
    one-process gloo group that the trainer's collectives run on)."""

    def __init__(self, job: TuneJob, environ: dict[str, str]):
        import torch.distributed as dist

        from pipelines.data.shard import load_manifest, read_split
        from pipelines.registry import Registry
        from pipelines.store import open_store
        from pipelines.train.job import TrainJob

        self.job = job
        self._closing: list[threading.Thread] = []
        probe = TrainJob(
            manifest_uri=job.manifest_uri,
            run_id="-",
            train=job.train,
            store=job.store,
            mlflow=job.mlflow,
        )
        store_cfg, mlflow_cfg = probe.with_secrets(environ)
        self.store = open_store(store_cfg)
        self.mlflow = mlflow_cfg.model_copy(update={"experiment": job.tuning.experiment})
        self.registry = Registry(self.mlflow)
        self._experiment = self.registry.experiment_id()
        manifest = load_manifest(self.store, job.manifest_uri)
        self.val = read_split(self.store, manifest, "val")
        self.label = manifest.data["label"]
        self.y = self.val[self.label].to_numpy()
        self._own_group = not dist.is_initialized()
        if self._own_group:
            # The trainer all-reduces its step count and waits at a barrier: a world of one
            # on an in-memory store makes those no-ops without a rendezvous.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def close(self) -> None:
        import torch.distributed as dist

        for closer in self._closing:
            closer.join()

        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()

    def _start_run(self, trial: optuna.Trial, params: dict[str, Any]) -> str:
        # RetryFailedTrialCallback marks a re-queued copy with the number it retries.
        retried = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        tags = {
            "mlflow.parentRunId": self.job.parent_run_id,
            f"{ATTR}study": self.job.study,
            f"{ATTR}trial_number": str(trial.number),
            f"{ATTR}worker": str(self.job.worker),
            f"{ATTR}manifest_uri": self.job.manifest_uri,
            **({f"{ATTR}retry_of_trial": str(retried)} if retried is not None else {}),
        }
        from mlflow.entities import Param

        client = self.registry.client
        run = client.create_run(self._experiment, run_name=f"trial-{trial.number}", tags=tags)
        run_id = str(run.info.run_id)
        # One write per trial start and end: parallel workers share one tracking store, and on
        # SQLite (the local profile) every write holds its lock.
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run_id

    def run(self, study: optuna.Study, trial: optuna.Trial) -> dict[str, Any]:
        """Train with the trial's params and tell the study how it ended (complete with the
        final validation loss, pruned, or failed: the exception is raised after telling).
        Everything after the trial was asked for is inside the telling: a SIGTERM while its
        MLflow run is being created still leaves it FAIL, not RUNNING."""
        import optuna

        from pipelines.train.worker import Trainer

        run_id: str | None = None
        epochs_run = 0
        curve: list[tuple[int, float]] = []

        def on_epoch(trainer: Trainer, epoch: int, train_loss: float) -> None:
            nonlocal epochs_run
            from pipelines.train.model import predict_proba
            from pipelines.train.worker import log_loss

            epochs_run = epoch + 1
            trainer.model.eval()
            val_loss = log_loss(self.y, predict_proba(trainer.model, self.val))
            trainer.model.train()
            trial.report(val_loss, epoch)
            curve.append((epoch, val_loss))
            # Pruning after the last epoch would save nothing and lose a finished result.
            if epochs_run < trainer.cfg.epochs and trial.should_prune():
                trainer.ckpt.wait()
                raise optuna.TrialPruned(f"val_loss {val_loss:.5f} after epoch {epoch}")

        trainer: Trainer | None = None
        try:
            job = self._prepare(trial)
            run_id = job.run_id
            trainer = Trainer(job, self.store, 0, 1, self.registry, on_epoch=on_epoch)
            result = trainer.train()
        except optuna.TrialPruned as exc:
            trial.set_user_attr(f"{ATTR}epochs_run", epochs_run)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            assert run_id is not None  # pruning happens inside train()
            self._end(run_id, "PRUNED", epochs_run, curve, ok=True)
            log.info("trial %d pruned: %s", trial.number, exc)
            return {"number": trial.number, "state": "PRUNED", "epochs_run": epochs_run}
        except BaseException:
            if trainer is not None:
                trainer.ckpt.wait()
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if run_id is not None:
                self._end(run_id, "FAIL", epochs_run, curve, ok=False)
            raise
        trial.set_user_attr(f"{ATTR}epochs_run", epochs_run)
        value = float(result["val_loss"])
        study.tell(trial, value)
        self._end(run_id, "COMPLETE", epochs_run, curve, ok=True)
        log.info("trial %d complete: val_loss %.5f", trial.number, value)
        return {
            "number": trial.number,
            "state": "COMPLETE",
            "value": value,
            "epochs_run": epochs_run,
        }

    def _prepare(self, trial: optuna.Trial) -> TrainJob:
        """The trial's sampled params, its attributes and nested MLflow run, and its TrainJob."""
        from pipelines.config import TrainSettings
        from pipelines.train.job import TrainJob

        params = suggest(trial, self.job.tuning.space)
        train = TrainSettings.model_validate(
            {
                **self.job.train.model_dump(),
                **params,
                # One process per trial: the parallelism is the workers, not DDP ranks.
                "nodes": 1,
                "procs_per_node": 1,
                "min_nodes": None,
                "params_from": "config",
            }
        )
        # Host and pid are already on the trial (``study._next_trial_of_this_process``).
        for key, value in {
            "worker": self.job.worker,
            "epochs_planned": train.epochs,
            "epochs_run": 0,
        }.items():
            trial.set_user_attr(f"{ATTR}{key}", value)
        run_id = self._start_run(trial, {**params, "hidden": list(train.hidden)})
        trial.set_user_attr(f"{ATTR}mlflow_run_id", run_id)
        job = TrainJob(
            manifest_uri=self.job.manifest_uri,
            run_id=run_id,
            train=train,
            store=self.job.store,
            mlflow=self.job.mlflow,
        )
        return job

    def _end(
        self,
        run_id: str,
        state: str,
        epochs_run: int,
        curve: list[tuple[int, float]],
        ok: bool,
    ) -> None:
        """The trial's state, its per-epoch validation losses (what the pruner saw) and its
        epoch count in one write, then the run ended."""
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.registry.client.log_batch(
            run_id,
            metrics=[Metric("val_loss_epoch", v, now, e) for e, v in curve]
            + [Metric("epochs_run", float(epochs_run), now, 0)],
            tags=[RunTag(f"{ATTR}trial_state", state)],
        )
        # Ending a run waits for MLflow's async-logging thread to notice (about 1 s, its queue
        # poll): off the worker's path, joined before the worker exits.
        closer = threading.Thread(
            target=self.registry.end_run, args=(run_id, ok), name="end-trial-run"
        )
        closer.start()
        self._closing.append(closer)
