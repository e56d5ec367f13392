"""The training entrypoint run by torchrun on every node: DDP, checkpoints, MLflow from rank 0.

``python -m pipelines.train --job JSON`` (a :class:`pipelines.train.job.TrainJob`, built by the
launcher or the pod's arguments). Each rank reads only the train shards under its share of rows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import cast

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipelines.data import layout
from pipelines.data.shard import Manifest, ManifestError, load_manifest, read_shards, read_split
from pipelines.registry import Registry
from pipelines.store import ObjectStore, open_store
from pipelines.train.checkpoint import Checkpoint, CheckpointManager
from pipelines.train.job import TrainJob, parse_job
from pipelines.train.model import (
    TabularMLP,
    encode_frame,
    model_from_manifest,
    predict_proba,
    save_model_bytes,
)
from pipelines.train.partition import RowSlice, rank_rows
from pipelines.train.result import format_result

log = logging.getLogger("pipelines.train")

# Called on rank 0 after each epoch with (trainer, epoch, mean train loss); it may raise to stop
# the run early (tuning reports the validation loss to its pruner here and raises when pruned).
EpochHook = Callable[["Trainer", int, float], None]


def ddp_setup(timeout_s: float) -> tuple[int, int]:
    """Init the process group (nccl on GPU, gloo on CPU); returns rank and world size."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A bounded collective timeout: a peer that died mid-step fails this rank instead of
    # hanging it, so the elastic agent can restart the group.
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def read_rank_rows(
    store: ObjectStore, manifest: Manifest, rank: int, world: int
) -> tuple[pd.DataFrame, list[RowSlice]]:
    """This rank's rows of the train split (see :func:`rank_rows`), read from only the shards
    that hold them, each checked against its sha256."""
    shards = manifest.shards("train")
    try:
        mine = rank_rows([int(s["rows"]) for s in shards], rank, world)
    except ValueError as exc:
        raise ManifestError(f"{manifest.uri}: {exc}") from None
    frames = [read_shards(store, manifest, [shards[p.shard]]).iloc[p.start : p.stop] for p in mine]
    return pd.concat(frames, ignore_index=True), mine


class Trainer:
    def __init__(
        self,
        job: TrainJob,
        store: ObjectStore,
        rank: int,
        world: int,
        registry: Registry | None = None,
        on_epoch: EpochHook | None = None,
    ):
        """``registry`` is rank 0's MLflow (metrics and the model); the other ranks have none.
        ``on_epoch`` (rank 0 only) runs after every epoch (see :data:`EpochHook`)."""
        self.job, self.cfg, self.store = job, job.train, store
        self.on_epoch = on_epoch
        self.rank, self.world, self.registry = rank, world, registry
        torch.manual_seed(self.cfg.seed)
        self.manifest = load_manifest(store, job.manifest_uri)
        frame, mine = read_rank_rows(store, self.manifest, rank, world)
        paths = [self.manifest.shards("train")[p.shard]["path"] for p in mine]
        log.info(
            "rank %d/%d reads %d train rows: %s",
            rank,
            world,
            len(frame),
            ", ".join(f"{path}[{p.start}:{p.stop}]" for path, p in zip(paths, mine, strict=True)),
        )
        m = self.manifest.data
        feats = m["features"]
        self.x = torch.from_numpy(
            encode_frame(frame, feats["numeric"], feats["categorical"], m["stats"])
        )
        self.y = torch.from_numpy(frame[m["label"]].to_numpy(dtype="float32"))
        self.model: TabularMLP = model_from_manifest(
            m, self.cfg.hidden, self.cfg.embedding_dim, self.cfg.dropout
        )
        # Local SGD trains each rank's replica alone and averages parameters every
        # `sync_every` steps (PeriodicModelAverager): far less communication than DDP.
        # A world of one has nothing to all-reduce: DDP's hooks would only add latency.
        ddp = self.cfg.sync == "ddp" and world > 1
        self.forward: nn.Module = (
            DDP(self.model, gradient_as_bucket_view=True) if ddp else self.model
        )
        self.averager = None
        if self.cfg.sync == "local_sgd":
            from torch.distributed.algorithms.model_averaging.averagers import (
                PeriodicModelAverager,
            )

            self.averager = PeriodicModelAverager(period=self.cfg.sync_every, warmup_steps=0)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.loss_fn = nn.BCEWithLogitsLoss()
        # Every rank runs the same number of steps, or DDP's all-reduce would hang.
        steps = torch.tensor([max(len(self.y) // self.cfg.batch_size, 1)])
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        self.steps_per_epoch = int(steps.item())
        self.log_every = max(1, min(10, self.steps_per_epoch // 4))
        self.ckpt = CheckpointManager(store, layout.checkpoints(job.run_id))
        self.step, self.start_epoch, self.start_step_in_epoch = 0, 0, 0
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self._load_snapshot()

    def _load_snapshot(self) -> None:
        snap = self.ckpt.latest()
        if snap is None:
            return
        self.model.load_state_dict(snap.model)
        self.opt.load_state_dict(snap.optimizer)
        torch.set_rng_state(snap.rng["torch"])
        self.step, self.start_epoch = snap.step, snap.epoch
        # A position inside an epoch only means something for the same world size; after an
        # elastic resize the data is re-partitioned, so the epoch restarts from its beginning.
        self.start_step_in_epoch = snap.step_in_epoch if snap.world_size == self.world else 0
        if self.rank == 0:
            log.info(
                "resumed from checkpoint at step %d (epoch %d, world %d -> %d)",
                snap.step,
                snap.epoch,
                snap.world_size,
                self.world,
            )

    def _save_snapshot(self, epoch: int, step_in_epoch: int) -> None:
        if self.rank != 0:
            return
        self.ckpt.save_async(
            Checkpoint(
                self.step,
                epoch,
                step_in_epoch,
                self.model.state_dict(),
                self.opt.state_dict(),
                {"torch": torch.get_rng_state()},
                self.world,
            )
        )

    def _run_batch(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.forward(xb), yb)
        loss.backward()
        self.opt.step()
        if self.averager is not None:
            self.averager.average_parameters(self.model.parameters())
        return float(loss.detach())

    def _run_epoch(self, epoch: int, metrics: list[tuple[str, float, int]]) -> float:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch * 31 + self.rank)
        order = torch.randperm(len(self.y), generator=g)
        bs = self.cfg.batch_size
        first = self.start_step_in_epoch if epoch == self.start_epoch else 0
        losses = []
        for i in range(first, self.steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            losses.append(self._run_batch(self.x[idx], self.y[idx]))
            self.step += 1
            if self.step % self.log_every == 0:
                metrics.append(("loss", float(np.mean(losses[-self.log_every :])), self.step))
            if self.step % self.cfg.checkpoint_every == 0:
                self._save_snapshot(epoch, i + 1)
        return float(np.mean(losses)) if losses else float("nan")

    def train(self) -> dict[str, float]:
        from mlflow.entities import Metric

        client = self.registry.client if self.registry is not None else None
        run_id = self.job.run_id
        # Every rank starts the clock together: otherwise the first rank to arrive counts its
        # wait for the slowest peer's start-up as training time.
        dist.barrier()
        started, samples = time.perf_counter(), 0
        epoch_loss = float("nan")
        pending_logs = []  # MLflow writes happen off the training thread
        for epoch in range(self.start_epoch, self.cfg.epochs):
            metrics: list[tuple[str, float, int]] = []
            done_before = self.step
            epoch_loss = self._run_epoch(epoch, metrics)
            samples += (self.step - done_before) * self.cfg.batch_size * self.world
            self._save_snapshot(epoch + 1, 0)
            if client is not None:
                now = int(time.time() * 1000)
                batch = [Metric(k, v, now, s) for k, v, s in metrics]
                batch.append(Metric("epoch_loss", epoch_loss, now, epoch))
                pending_logs.append(client.log_batch(run_id, metrics=batch, synchronous=False))
                log.info("epoch %d loss %.5f step %d", epoch, epoch_loss, self.step)
            if self.on_epoch is not None and self.rank == 0:
                self.on_epoch(self, epoch, epoch_loss)
        self.ckpt.wait()  # the last checkpoint is durable before the run reports success
        for op in pending_logs:
            if op is not None:
                op.wait()
        if self.averager is not None:  # the final model is the average of all replicas
            from torch.distributed.algorithms.model_averaging.utils import average_parameters

            world = cast(dist.ProcessGroup, dist.group.WORLD)
            average_parameters(self.model.parameters(), world)
        elapsed = time.perf_counter() - started
        result = {
            "train_loss": epoch_loss,
            "samples_per_s": samples / max(elapsed, 1e-9),
            "world_size": float(self.world),
            "steps": float(self.step),
            "restarts": float(self.restarts),
        }
        if self.registry is not None:  # rank 0
            result.update(self._finish(self.registry))
            # Rank 0 records the run's summary itself: on Kubernetes no launcher reads stdout.
            now = int(time.time() * 1000)
            self.registry.client.log_batch(
                run_id, metrics=[Metric(k, float(v), now, 0) for k, v in result.items()]
            )
        return result

    def _finish(self, registry: Registry) -> dict[str, float]:
        """Rank 0: validation metrics, and the final model to the store and to MLflow."""
        from sklearn.metrics import roc_auc_score

        self.model.eval()
        val = read_split(self.store, self.manifest, "val")
        label = self.manifest.data["label"]
        p = predict_proba(self.model, val)
        val_auc = float(roc_auc_score(val[label], p)) if val[label].nunique() > 1 else float("nan")
        data = save_model_bytes(self.model)
        self.ckpt.save_final(data)
        registry.log_bytes(self.job.run_id, data, "model", "model.pt")
        return {"val_auc": val_auc, "val_loss": log_loss(val[label].to_numpy(), p)}


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` for labels ``y`` (the run's val_loss)."""
    y = y.astype("float64")
    q = np.clip(p.astype("float64"), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    job = parse_job(argv)
    # The one place the job meets its secrets: they come from this process's environment.
    store_cfg, mlflow_cfg = job.with_secrets(os.environ)
    torch.set_num_threads(1)
    rank, world = ddp_setup(job.train.dist_timeout_s)
    registry = Registry(mlflow_cfg) if rank == 0 else None
    result = Trainer(job, open_store(store_cfg), rank, world, registry).train()
    if rank == 0:
        print(format_result(result), flush=True)
    # Only a healthy group is torn down: after a failure, destroy_process_group can block on
    # peers that are gone; the process exits with the exception and the agent handles it.
    dist.destroy_process_group()
    return 0
