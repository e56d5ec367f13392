"""One checkpoint manager owns all checkpoint I/O: atomic writes to the store, resume, and the
final model."""

from __future__ import annotations

import copy
import io
import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.store import ObjectStore

LATEST = "latest.json"
FINAL_MODEL = "final/model.pt"


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
    """Checkpoints under ``checkpoints/<run>/``: ``step-NNNNNNNN.pt`` then ``latest.json`` last;
    the trained model as ``final/model.pt``."""

    def __init__(self, store: ObjectStore, prefix: str, keep: int = 2):
        self.store, self.prefix, self.keep = store, prefix.strip("/"), keep
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    def save_async(self, ckpt: Checkpoint) -> None:
        """Snapshot tensors now (a copy), write in the background; one write in flight.

        Training continues while serialisation and I/O happen; a failed write surfaces at the
        next save or at :meth:`wait`."""
        self.wait()
        snapshot = Checkpoint(
            ckpt.step,
            ckpt.epoch,
            ckpt.step_in_epoch,
            _copy(ckpt.model),
            _copy(ckpt.optimizer),
            _copy(ckpt.rng),
            ckpt.world_size,
        )

        def write() -> None:
            try:
                self.save(snapshot)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                self._error = exc

        self._pending = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._pending.start()

    def wait(self) -> None:
        """Block until the background write is durable; re-raise its failure."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"Checkpoint write under {self.prefix} failed: {err}") from err

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

    def save_final(self, model_bytes: bytes) -> str:
        """Write the trained model (``save_model_bytes``) beside the checkpoints; its URI.

        Pending checkpoint writes finish first, so a final model never sits beside a run
        whose last checkpoint failed."""
        self.wait()
        key = f"{self.prefix}/{FINAL_MODEL}"
        self.store.write_bytes(key, model_bytes)
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


def _copy(state: Any) -> Any:
    """Deep copy of a (nested) state dict with tensors cloned, so training can go on."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy(v) for v in state)
    return copy.copy(state)
