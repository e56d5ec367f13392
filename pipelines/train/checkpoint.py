"""One checkpoint manager owns all checkpoint I/O: atomic writes to the store, resume."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.store import ObjectStore

LATEST = "latest.json"


@dataclass
class Checkpoint:
    step: int
    epoch: int
    step_in_epoch: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    world_size: int


class CheckpointManager:
    """Checkpoints under ``checkpoints/<run>/``: ``step-NNNNNNNN.pt`` then ``latest.json`` last."""

    def __init__(self, store: ObjectStore, prefix: str, keep: int = 2):
        self.store, self.prefix, self.keep = store, prefix.strip("/"), keep

    def save(self, ckpt: Checkpoint) -> str:
        buf = io.BytesIO()
        torch.save(ckpt.__dict__, buf)
        key = f"{self.prefix}/step-{ckpt.step:08d}.pt"
        self.store.write_bytes(key, buf.getvalue())
        self.store.write_text(
            f"{self.prefix}/{LATEST}", json.dumps({"step": ckpt.step, "key": key})
        )
        self._prune()
        return self.store.uri(key)

    def _prune(self) -> None:
        olds = sorted(
            k for k in self.store.list(self.prefix) if k.rsplit("/", 1)[-1].startswith("step-")
        )
        for key in olds[: -self.keep]:
            self.store.delete(key)

    def latest(self) -> Checkpoint | None:
        if not self.store.exists(f"{self.prefix}/{LATEST}"):
            return None
        pointer = json.loads(self.store.read_text(f"{self.prefix}/{LATEST}"))
        blob = torch.load(
            io.BytesIO(self.store.read_bytes(pointer["key"])),
            map_location="cpu",
            weights_only=False,
        )
        return Checkpoint(**blob)
