"""The training entrypoint run by torchrun on every node: DDP, checkpoints, MLflow from rank 0.

``python -m pipelines.train --manifest URI --run-id MLFLOW_RUN_ID [--epochs E ...]``
Each node reads only the training shards the manifest assigns to it (data locality).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipelines.config import load_settings
from pipelines.data import layout
from pipelines.data.shard import Manifest, load_manifest, read_shards, read_split
from pipelines.store import ObjectStore, open_store
from pipelines.train.checkpoint import Checkpoint, CheckpointManager
from pipelines.train.model import (
    TabularMLP,
    encode_frame,
    model_from_manifest,
    predict_proba,
    save_model_bytes,
)

log = logging.getLogger("pipelines.train")


@dataclass(frozen=True)
class TrainArgs:
    manifest: str
    run_id: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    checkpoint_every: int
    hidden: tuple[int, ...]
    embedding_dim: int
    sync: str = "ddp"
    """'ddp': all-reduce gradients every step; 'local_sgd': average parameters every N steps."""
    sync_every: int = 8


def ddp_setup() -> tuple[int, int, int, int]:
    """Init the process group (nccl on GPU, gloo on CPU); returns rank, world, node, nnodes."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A bounded collective timeout: a peer that died mid-step fails this rank instead of
    # hanging it, so the elastic agent can restart the group.
    timeout = timedelta(seconds=float(os.environ.get("MLOPS_DIST_TIMEOUT_S", "300")))
    dist.init_process_group(backend=backend, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    node = int(os.environ.get("GROUP_RANK", "0"))
    return rank, world, node, max(world // local_world, 1)


def node_shards(manifest: Manifest, node: int, nnodes: int) -> list[dict]:
    """This node's train shards: round-robin over the manifest's (its content, and so its
    data version, does not depend on how many nodes read it)."""
    return manifest.shards("train")[node::nnodes]


class Trainer:
    def __init__(
        self, args: TrainArgs, store: ObjectStore, rank: int, world: int, node: int, nnodes: int
    ):
        self.args, self.store, self.rank, self.world = args, store, rank, world
        torch.manual_seed(args.seed)
        self.manifest = load_manifest(store, args.manifest)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        mine = node_shards(self.manifest, node, nnodes)
        frame = read_shards(store, self.manifest, mine)
        frame = frame.iloc[local_rank::local_world]
        log.info(
            "rank %d/%d on node %d reads %d rows from shards %s",
            rank,
            world,
            node,
            len(frame),
            [s["path"] for s in mine],
        )
        m = self.manifest.data
        feats = m["features"]
        self.x = torch.from_numpy(
            encode_frame(frame, feats["numeric"], feats["categorical"], m["stats"])
        )
        self.y = torch.from_numpy(frame[m["label"]].to_numpy(dtype="float32"))
        self.model: TabularMLP = model_from_manifest(m, args.hidden, args.embedding_dim)
        # Local SGD trains each rank's replica alone and averages parameters every
        # `sync_every` steps (PeriodicModelAverager): far less communication than DDP.
        # A world of one has nothing to all-reduce: DDP's hooks would only add latency.
        ddp = args.sync == "ddp" and world > 1
        self.forward: nn.Module = (
            DDP(self.model, gradient_as_bucket_view=True) if ddp else self.model
        )
        self.averager = None
        if args.sync == "local_sgd":
            from torch.distributed.algorithms.model_averaging.averagers import (
                PeriodicModelAverager,
            )

            self.averager = PeriodicModelAverager(period=args.sync_every, warmup_steps=0)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.loss_fn = nn.BCEWithLogitsLoss()
        # Every rank runs the same number of steps, or DDP's all-reduce would hang.
        steps = torch.tensor([max(len(self.y) // args.batch_size, 1)])
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        self.steps_per_epoch = int(steps.item())
        self.log_every = max(1, min(10, self.steps_per_epoch // 4))
        self.ckpt = CheckpointManager(store, layout.checkpoints(args.run_id))
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
        g = torch.Generator().manual_seed(self.args.seed * 1000 + epoch * 31 + self.rank)
        order = torch.randperm(len(self.y), generator=g)
        bs = self.args.batch_size
        first = self.start_step_in_epoch if epoch == self.start_epoch else 0
        losses = []
        for i in range(first, self.steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            losses.append(self._run_batch(self.x[idx], self.y[idx]))
            self.step += 1
            if self.step % self.log_every == 0:
                metrics.append(("loss", float(np.mean(losses[-self.log_every :])), self.step))
            if self.step % self.args.checkpoint_every == 0:
                self._save_snapshot(epoch, i + 1)
        return float(np.mean(losses)) if losses else float("nan")

    def train(self) -> dict[str, float]:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(load_settings().mlflow.tracking_uri) if self.rank == 0 else None
        started, samples = time.perf_counter(), 0
        epoch_loss = float("nan")
        pending_logs = []  # MLflow writes happen off the training thread
        for epoch in range(self.start_epoch, self.args.epochs):
            metrics: list[tuple[str, float, int]] = []
            done_before = self.step
            epoch_loss = self._run_epoch(epoch, metrics)
            samples += (self.step - done_before) * self.args.batch_size * self.world
            self._save_snapshot(epoch + 1, 0)
            if client is not None:
                now = int(time.time() * 1000)
                batch = [Metric(k, v, now, s) for k, v, s in metrics]
                batch.append(Metric("epoch_loss", epoch_loss, now, epoch))
                pending_logs.append(
                    client.log_batch(self.args.run_id, metrics=batch, synchronous=False)
                )
                log.info("epoch %d loss %.5f step %d", epoch, epoch_loss, self.step)
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
        if client is not None:  # rank 0
            result.update(self._finish(client))
            # Rank 0 records the run's summary itself: on Kubernetes no launcher reads stdout.
            now = int(time.time() * 1000)
            client.log_batch(
                self.args.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in result.items()]
            )
        return result

    def _finish(self, client: Any) -> dict[str, float]:
        """Rank 0: validation metrics, the final model to MLflow, summary metrics."""
        from sklearn.metrics import roc_auc_score

        self.model.eval()
        val = read_split(self.store, self.manifest, "val")
        label = self.manifest.data["label"]
        p = predict_proba(self.model, val)
        val_auc = float(roc_auc_score(val[label], p)) if val[label].nunique() > 1 else float("nan")
        data = save_model_bytes(self.model)
        key = f"{layout.checkpoints(self.args.run_id)}/final/model.pt"
        self.store.write_bytes(key, data)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            with open(path, "wb") as fh:
                fh.write(data)
            client.log_artifact(self.args.run_id, path, artifact_path="model")
        y = val[label].to_numpy(dtype="float64")
        q = np.clip(p.astype("float64"), 1e-7, 1 - 1e-7)
        val_loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
        return {"val_auc": val_auc, "val_loss": val_loss}


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    s = load_settings().train
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__)
    p.add_argument("--manifest", required=True, help="URI of the data set's manifest.json")
    p.add_argument("--run-id", required=True, help="MLflow run that receives metrics and model")
    p.add_argument("--epochs", type=int, default=s.epochs)
    p.add_argument("--batch-size", type=int, default=s.batch_size)
    p.add_argument("--lr", type=float, default=s.lr)
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--checkpoint-every", type=int, default=s.checkpoint_every)
    p.add_argument("--hidden", type=lambda v: tuple(int(x) for x in v.split(",")), default=s.hidden)
    p.add_argument("--embedding-dim", type=int, default=s.embedding_dim)
    p.add_argument("--sync", choices=["ddp", "local_sgd"], default=s.sync)
    p.add_argument("--sync-every", type=int, default=s.sync_every)
    a = p.parse_args(argv)
    return TrainArgs(
        a.manifest,
        a.run_id,
        a.epochs,
        a.batch_size,
        a.lr,
        a.seed,
        a.checkpoint_every,
        tuple(a.hidden),
        a.embedding_dim,
        a.sync,
        a.sync_every,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)
    rank, world, node, nnodes = ddp_setup()
    trainer = Trainer(args, open_store(load_settings().store), rank, world, node, nnodes)
    result = trainer.train()
    if rank == 0:
        print("MLOPS_TRAIN_RESULT " + json.dumps(result), flush=True)
    # Only a healthy group is torn down: after a failure, destroy_process_group can block on
    # peers that are gone; the process exits with the exception and the agent handles it.
    dist.destroy_process_group()
    return 0
