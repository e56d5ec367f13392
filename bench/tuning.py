"""Tuning: TPE with pruning vs random search at the same trial budget, and 2 workers vs 1.

Everything is the shipped path (``pipelines.tune.run.tune``): one Optuna study per arm on the
project's own PostgreSQL, worker processes running the real trainer on one fixed small data set
(the ``transactions`` generator, seed 0), every trial a nested MLflow run.

- **search**: for each of ``--seeds`` seeds, a study with the TPE sampler and the configured
  pruner (``tuning.pruner``, Hyperband) and a study with the random sampler and no pruner, each
  planning ``--epochs`` epochs a trial (the pruner's resource) with
  ``--trials`` trials and one worker (so a seed gives the same trials every time; with parallel
  workers the order of results depends on timing). The figure per arm is the median over seeds
  of the study's best validation loss. ``pruned_epoch_share`` is the share of the TPE trials'
  planned epochs that pruning did not run.
- **workers**: on a larger day (``--speed-rows``), the same ``--speed-trials`` trials of fixed
  work (epochs and batch size fixed, only the learning rate varies, random sampler, no pruner)
  with 1 worker and with 2, in ``--rounds`` interleaved rounds; ``workers_speedup`` is the
  median of the paired ratios of wall time of the whole ``tune`` call (worker start-up, study
  creation and the summary included). Torch threads per worker are cores // workers, as
  shipped; a third mode, 1 worker held to 1 thread, gives ``workers_speedup_vs_one_thread``
  (the second intra-op thread of a lone worker does not pay on layers this small).

    .venv/bin/python bench/tuning.py [--rows 20000] [--trials 24] [--startup-trials 6] [--seeds 3]
                                     [--pruner hyperband] [--speed-rows 30000] [--speed-trials 24]
                                     [--speed-epochs 8] [--speed-batch-size 128] [--rounds 2]
                                     [--tpe-without-pruning] [--epochs 8] [--search-epochs]
                                     [--warmup-epochs N] [--prune-startup-trials N]

``--seeds 0`` runs the workers comparison alone.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

SPACE = {
    "lr": {"kind": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "hidden": {"kind": "categorical", "choices": [[16], [64, 32], [128, 64]]},
    "dropout": {"kind": "float", "low": 0.0, "high": 0.5},
    "batch_size": {"kind": "categorical", "choices": [128, 256, 512]},
    "epochs": {"kind": "int", "low": 2, "high": 8},
    "embedding_dim": {"kind": "int", "low": 2, "high": 8},
}


def speed_space(epochs: int, batch_size: int) -> dict[str, Any]:
    """Every dimension named (overrides merge into the default space): only the learning rate
    varies, so each trial does the same work whichever worker's sampler drew it."""
    return {
        "lr": {"kind": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "hidden": {"kind": "categorical", "choices": [[64, 32]]},
        "dropout": {"kind": "float", "low": 0.0, "high": 0.0},
        "batch_size": {"kind": "categorical", "choices": [batch_size]},
        "epochs": {"kind": "int", "low": epochs, "high": epochs},
        "embedding_dim": {"kind": "int", "low": 4, "high": 4},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--startup-trials", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--pruner", choices=["median", "hyperband"], default=None, help="default: tuning.pruner"
    )
    ap.add_argument("--speed-rows", type=int, default=30000)
    ap.add_argument("--speed-trials", type=int, default=24)
    ap.add_argument("--speed-epochs", type=int, default=8)
    ap.add_argument("--speed-batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--epochs",
        type=int,
        default=8,
        help="every trial plans this many epochs, the pruner's resource (as shipped: epochs "
        "are not searched)",
    )
    ap.add_argument(
        "--search-epochs",
        action="store_true",
        help="search epochs in 2-8 instead (the default space before session 10)",
    )
    ap.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help="median pruner: epochs before a trial can be pruned (default: tuning.warmup_epochs)",
    )
    ap.add_argument(
        "--prune-startup-trials",
        type=int,
        default=None,
        help="median pruner: finished trials before any is pruned "
        "(default: tuning.prune_startup_trials)",
    )
    ap.add_argument(
        "--tpe-without-pruning",
        action="store_true",
        help="a third arm: TPE with no pruner (what pruning costs TPE in quality)",
    )
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="bench-tuning-")
    os.environ["MLOPS_HOME"] = home
    os.environ["MLOPS__TRAIN__NODES"] = "1"
    started = time.perf_counter()

    from pipelines import stages
    from pipelines.config import load_settings, with_overrides
    from pipelines.tune.run import tune
    from pipelines.tune.storage import local_server
    from pipelines.tune.study import cores

    base = load_settings()
    stages.generate_data(base, "2026-11-01", rows=args.rows, seed=0)
    stages.validate_data(base, "2026-11-01")
    shards = stages.shard_data(base, "2026-11-01")
    manifest = shards["manifest_uri"]
    # The workers comparison trains on a larger day so that a trial's work, not the fixed
    # start-up of a worker process, is what is measured (start-up stays in the wall time).
    stages.generate_data(base, "2026-11-02", rows=args.speed_rows, seed=1)
    stages.validate_data(base, "2026-11-02")
    speed_shards = stages.shard_data(base, "2026-11-02")
    tails: list[str] = []

    def quiet(line: str) -> None:
        tails.append(line)
        del tails[:-50]

    def run(
        name: str,
        workers: int,
        trials: int,
        train: dict[str, Any] | None = None,
        data: str = manifest,
        **tuning: Any,
    ) -> dict[str, Any]:
        s = with_overrides(base, tuning=tuning, train=train or {})
        t0 = time.perf_counter()
        try:
            out = tune(s, data, trials=trials, workers=workers, study=name, sink=quiet)
        except Exception:
            print("\n".join(tails))
            raise
        out["wall_s"] = time.perf_counter() - t0
        return out

    space = dict(SPACE)
    if not args.search_epochs:
        space["epochs"] = {"kind": "int", "low": args.epochs, "high": args.epochs}
    pruner_name = args.pruner or base.tuning.pruner
    # Median-pruner settings given on the command line; the rest come from tuning.*.
    pruner_overrides = {
        k: v
        for k, v in (
            ("warmup_epochs", args.warmup_epochs),
            ("prune_startup_trials", args.prune_startup_trials),
        )
        if v is not None
    }
    pruner_settings = with_overrides(base, tuning=pruner_overrides).tuning
    search: dict[str, list[dict[str, Any]]] = {"tpe": [], "random": [], "tpe_no_pruning": []}
    arms = [("tpe", "tpe", pruner_name), ("random", "random", "none")]
    if args.tpe_without_pruning:
        arms.append(("tpe_no_pruning", "tpe", "none"))
    # 1: one worker as shipped (cores // 1 torch threads); 0: one worker held to one thread
    # (the fairer baseline for tiny layers, where a second intra-op thread only adds waits).
    speed: dict[int, list[float]] = {1: [], 0: [], 2: []}
    # One server for the whole bench: each tune call finds it running and leaves it up.
    with local_server(base):
        for seed in range(args.seeds):
            for arm, sampler, pruner in arms:
                out = run(
                    f"{arm}-{seed}",
                    1,
                    args.trials,
                    space=space,
                    sampler=sampler,
                    pruner=pruner,
                    seed=seed,
                    startup_trials=args.startup_trials,
                    **pruner_overrides,
                )
                search[arm].append(out)
                print(
                    f"{arm:14s} seed {seed}: best val_loss {out['best_value']:.5f} "
                    f"({out['complete']} complete, {out['pruned']} pruned, "
                    f"{out['epochs_run']}/{out['epochs_planned']} epochs) {out['wall_s']:.1f} s",
                    flush=True,
                )
        for r in range(args.rounds):
            for mode in (1, 0, 2) if r % 2 == 0 else (2, 0, 1):
                out = run(
                    f"speed-{r}-{mode}",
                    max(mode, 1),
                    args.speed_trials,
                    train={"epochs": args.speed_epochs, "batch_size": args.speed_batch_size},
                    data=speed_shards["manifest_uri"],
                    space=speed_space(args.speed_epochs, args.speed_batch_size),
                    sampler="random",
                    pruner="none",
                    seed=100 + r,
                    threads=1 if mode == 0 else None,
                )
                assert out["complete"] == args.speed_trials, out
                speed[mode].append(out["wall_s"])
                label = {1: "1 worker", 0: "1 worker, 1 thread", 2: "2 workers"}[mode]
                print(f"round {r}: {label} {out['wall_s']:.1f} s", flush=True)

    def med(xs: list[float]) -> float:
        return float(statistics.median(xs)) if xs else float("nan")

    tpe_best = [o["best_value"] for o in search["tpe"]]
    random_best = [o["best_value"] for o in search["random"]]
    planned = sum(o["epochs_planned"] for o in search["tpe"])
    ran = sum(o["epochs_run"] for o in search["tpe"])
    pruned_share = 1 - ran / planned if planned else 0.0
    ratios = [one / two for one, two in zip(speed[1], speed[2], strict=True)]
    ratios_1t = [one / two for one, two in zip(speed[0], speed[2], strict=True)]
    result = {
        "bench": "tuning",
        "rows": args.rows,
        "train_rows": shards["rows"]["train"],
        "cores": cores(),
        "trials": args.trials,
        "seeds": args.seeds,
        "pruner": pruner_name,
        "epochs": "searched 2-8" if args.search_epochs else args.epochs,
        "warmup_epochs": pruner_settings.warmup_epochs,
        "prune_startup_trials": pruner_settings.prune_startup_trials,
        "startup_trials": args.startup_trials,
        "best_val_loss_tpe": round(med(tpe_best), 5) if tpe_best else None,
        "best_val_loss_random": round(med(random_best), 5) if random_best else None,
        "best_val_loss_tpe_per_seed": [round(v, 5) for v in tpe_best],
        "best_val_loss_random_per_seed": [round(v, 5) for v in random_best],
        **(
            {
                "best_val_loss_tpe_no_pruning": round(
                    med([o["best_value"] for o in search["tpe_no_pruning"]]), 5
                ),
                "best_val_loss_tpe_no_pruning_per_seed": [
                    round(o["best_value"], 5) for o in search["tpe_no_pruning"]
                ],
            }
            if search["tpe_no_pruning"]
            else {}
        ),
        "tpe_pruned_trials": sum(o["pruned"] for o in search["tpe"]),
        "tpe_epochs_run": ran,
        "tpe_epochs_planned": planned,
        "random_epochs_run": sum(o["epochs_run"] for o in search["random"]),
        "pruned_epoch_share": round(pruned_share, 3),
        "tpe_wall_s": round(sum(o["wall_s"] for o in search["tpe"]), 1),
        "random_wall_s": round(sum(o["wall_s"] for o in search["random"]), 1),
        "speed_train_rows": speed_shards["rows"]["train"],
        "speed_trials": args.speed_trials,
        "speed_epochs": args.speed_epochs,
        "speed_batch_size": args.speed_batch_size,
        "one_worker_wall_s": [round(x, 2) for x in speed[1]],
        "one_worker_one_thread_wall_s": [round(x, 2) for x in speed[0]],
        "two_workers_wall_s": [round(x, 2) for x in speed[2]],
        "workers_speedup_per_round": [round(x, 3) for x in ratios],
        "workers_speedup": round(med(ratios), 3) if ratios else None,
        "workers_speedup_vs_one_thread": round(med(ratios_1t), 3) if ratios_1t else None,
        "workers_speedup_vs_one_thread_per_round": [round(x, 3) for x in ratios_1t],
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    # None: not measured in this run (--seeds 0 or --rounds 0).
    result["goals"] = {
        "tpe_median_best_le_random": med(tpe_best) <= med(random_best) if tpe_best else None,
        "pruning_saves_30pct_epochs": pruned_share >= 0.30 if planned else None,
        "workers_speedup_ge_1_6": result["workers_speedup"] >= 1.6 if ratios else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
