"""The checkpoint manager owns checkpoint I/O, the final model included."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.store import ObjectStore
from pipelines.train.checkpoint import Checkpoint, CheckpointManager


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint(step, 0, step, {"w": torch.ones(2) * step}, {}, {}, 2)


def test_the_final_model_sits_beside_the_checkpoints_and_survives_pruning(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}/lake")
    mgr = CheckpointManager(store, "checkpoints/run-1", keep=1)
    mgr.save_async(_ckpt(10))
    uri = mgr.save_final(b"weights")
    assert uri == store.uri("checkpoints/run-1/final/model.pt")
    assert store.read_bytes("checkpoints/run-1/final/model.pt") == b"weights"
    mgr.save(_ckpt(20))  # pruning keeps one step file and never touches the final model
    names = sorted(k.rsplit("/", 1)[-1] for k in store.list("checkpoints/run-1"))
    assert names == ["final", "latest.json", "step-00000020.pt"]
    assert store.read_bytes("checkpoints/run-1/final/model.pt") == b"weights"
    latest = mgr.latest()
    assert latest is not None and latest.step == 20
