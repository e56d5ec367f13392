"""Training throughput: the real trainer reading shards from the store vs a bare in-memory loop.

Both run in this process on the same model, batch size, data and number of optimizer steps:

- ``bare``: the same ``TabularMLP``, Adam and loss over pre-encoded in-memory tensors, no DDP,
  no logging, no checkpoints (the ceiling);
- ``trainer``: ``pipelines.train.worker.Trainer`` in a world of one (gloo), reading and
  checksumming its shards from the object store, DDP-wrapped, logging to MLflow, with
  ``checkpoint_every`` steps between atomic checkpoints; its rate includes reading the shards;
- ``trainer_no_ckpt``: the same with snapshots disabled (none at all, not even at epoch ends),
  to isolate the checkpoint share.

A single ~1 s run moves by several per cent on a shared machine, so the three modes run in
``--rounds`` interleaved rounds (after one warm-up) and the figures are medians: trainer/bare
from the median rates, the checkpoint share from the median of each round's paired loop-time
difference. The spread across rounds is printed too.

    .venv/bin/python bench/training.py [--rows 100000] [--epochs 4] [--checkpoint-every 200]
                                       [--rounds 5]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="bench-training-")
    os.environ.update(
        MLOPS_HOME=home,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        GROUP_RANK="0",
    )
    import torch
    import torch.distributed as dist
    from torch import nn

    from pipelines import stages
    from pipelines.config import load_settings, with_overrides
    from pipelines.data.shard import load_manifest, read_split
    from pipelines.registry import Registry
    from pipelines.store import open_store
    from pipelines.train.job import TrainJob
    from pipelines.train.model import encode_frame, model_from_manifest
    from pipelines.train.run import start_training_run
    from pipelines.train.worker import Trainer

    torch.set_num_threads(1)
    settings = with_overrides(
        load_settings(),
        train={"epochs": args.epochs, "batch_size": args.batch_size, "lr": 3e-3, "seed": 7},
    )
    stages.generate_data(settings, "2026-11-01", rows=args.rows)
    manifest_uri = stages.shard_data(settings, "2026-11-01")["manifest_uri"]
    store = open_store(settings.store)
    manifest = load_manifest(store, manifest_uri)
    dist.init_process_group("gloo")

    def trainer(checkpoint_every: int, snapshots: bool = True) -> dict[str, float]:
        run_id, _ = start_training_run(settings, manifest_uri, None)  # fresh: no resume
        run = with_overrides(settings, train={"checkpoint_every": checkpoint_every})
        job = TrainJob.for_run(run, manifest_uri, run_id)
        t0 = time.perf_counter()
        tr = Trainer(job, store, 0, 1, Registry(run.mlflow))
        load_s = time.perf_counter() - t0
        if not snapshots:
            tr._save_snapshot = lambda epoch, step_in_epoch: None  # type: ignore[method-assign]
        result = tr.train()
        loop_s = result["steps"] * args.batch_size / result["samples_per_s"]
        return {
            "steps": result["steps"],
            "load_s": load_s,
            "loop_s": loop_s,
            "samples_per_s": result["steps"] * args.batch_size / (load_s + loop_s),
        }

    def bare(steps: int) -> dict[str, float]:
        m = manifest.data
        train = read_split(store, manifest, "train")
        x = torch.from_numpy(
            encode_frame(train, m["features"]["numeric"], m["features"]["categorical"], m["stats"])
        )
        y = torch.from_numpy(train[m["label"]].to_numpy(dtype="float32"))
        t = settings.train
        torch.manual_seed(t.seed)
        model = model_from_manifest(m, t.hidden, t.embedding_dim)
        opt = torch.optim.Adam(model.parameters(), lr=t.lr)
        loss_fn = nn.BCEWithLogitsLoss()
        per_epoch = len(y) // args.batch_size
        t0 = time.perf_counter()
        done = 0
        while done < steps:
            order = torch.randperm(len(y))
            for i in range(min(per_epoch, steps - done)):
                idx = order[i * args.batch_size : (i + 1) * args.batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
                done += 1
        return {
            "steps": float(steps),
            "samples_per_s": steps * args.batch_size / (time.perf_counter() - t0),
        }

    trainer(10**9)  # warm-up: imports, MLflow tables, allocator
    rounds: dict[str, list[dict[str, float]]] = {"trainer": [], "no_ckpt": [], "bare": []}
    for _ in range(args.rounds):
        rounds["trainer"].append(trainer(args.checkpoint_every))
        rounds["no_ckpt"].append(trainer(args.checkpoint_every, snapshots=False))
        rounds["bare"].append(bare(int(rounds["trainer"][-1]["steps"])))
    dist.destroy_process_group()

    def med(mode: str, key: str) -> float:
        return float(statistics.median(r[key] for r in rounds[mode]))

    ratios = [
        t["samples_per_s"] / b["samples_per_s"]
        for t, b in zip(rounds["trainer"], rounds["bare"], strict=True)
    ]
    shares = [
        (t["loop_s"] - n["loop_s"]) / t["loop_s"]
        for t, n in zip(rounds["trainer"], rounds["no_ckpt"], strict=True)
    ]
    steps = int(rounds["trainer"][0]["steps"])
    result = {
        "bench": "training",
        "rows": args.rows,
        "train_rows": manifest.rows("train"),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps": steps,
        "checkpoint_every": args.checkpoint_every,
        "checkpoints_per_run": steps // args.checkpoint_every + args.epochs,
        "rounds": args.rounds,
        "bare_samples_per_s": round(med("bare", "samples_per_s")),
        "trainer_samples_per_s": round(med("trainer", "samples_per_s")),
        "trainer_no_ckpt_samples_per_s": round(med("no_ckpt", "samples_per_s")),
        "trainer_over_bare": round(
            med("trainer", "samples_per_s") / med("bare", "samples_per_s"), 3
        ),
        "trainer_over_bare_per_round": [round(r, 3) for r in ratios],
        "shard_read_s": round(med("trainer", "load_s"), 3),
        "checkpoint_share_of_step_time": round(float(statistics.median(shares)), 4),
        "checkpoint_share_per_round": [round(s, 4) for s in shares],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
