"""A real Airflow (``airflow standalone``: scheduler, dag-processor, api-server, triggerer,
LocalExecutor) on a real PostgreSQL, both started by ``mlops airflow`` as ``make airflow`` does:
a backfill of two days from the CLI, then a run triggered through the REST API with params, as
the UI does (the first deployment); then a drifted day whose canary is judged under the
scheduler with its sensor SIGKILLed mid-analysis, and a monitoring run whose retrain the
scheduler runs to a new version and its own canary verdict; then everything it started must be
stopped.

Not SQLite: with a running scheduler, a second writer such as ``airflow backfill create`` gets
"database is locked" at once whenever its transaction would wait on the scheduler's (CI hit it
four times in a row). Airflow runs on PostgreSQL in production for this reason."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipelines.ports import free_port
from pipelines.serving.daemon import alive
from tests.ports import FREE_PORTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "mlops_training_pipeline"
# Two days make a backfill of several runs, one at a time (a third added a whole training run
# and nothing the first two do not show).
DAYS = ["2026-10-01", "2026-10-02"]
DRIFTED_DAY = "2026-10-04"
MONITOR_DAG_ID = "mlops_model_monitoring"
DONE = {"success", "failed"}


@pytest.fixture
def airflow(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``mlops airflow`` (what ``make airflow`` runs) in a temporary home: PostgreSQL, then
    ``airflow standalone``. After the test it is stopped as a user's Ctrl-C or a supervisor's
    SIGTERM would, and nothing of it may be left running."""
    from pipelines.postgres import LocalPostgres
    from pipelines.serving.daemon import stop_all
    from tests.processes import http_ok, running
    from tests.ui_check import airflow_env

    port = free_port()
    env = {
        **airflow_env(tmp_path / "mlops", tmp_path / "airflow", port),
        **FREE_PORTS,
        "MLOPS__DATAPLANE__REPLICAS": "1",
        "MLOPS__TRAIN__EPOCHS": "3",
        # The backfill and the REST trigger below log in like a user does.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # One hour of live traffic to judge: drift in one judged hour counts as sustained
        # (deployments read several hours; the demo does the same).
        "MLOPS__MONITORING__DRIFT_HOURS": "1",
        # This test is about the scheduler's loop, not the blessing: on 12,000 rows a day's
        # bootstrap CI is about +-0.015 wide, and the default 0.02 regression bound rejected a
        # drifted day's challenger here once, so the canary had nothing to judge.
        "MLOPS__EVALUATE__MAX_AUC_REGRESSION": "0.1",
        # The canaries here check the loop (a verdict over several pokes, an analysis resumed
        # after its sensor is killed), not the judge's power: a budget of 300 canary requests
        # (about five windows) instead of 1,000 (about 90 s of replay each at 5 %).
        "MLOPS__CANARY__MAX_CANARY_REQUESTS": "300",
    }
    mlops = str(Path(sys.executable).parent / "mlops")
    base = f"http://127.0.0.1:{port}"
    env_sh = tmp_path / "airflow" / "mlops-env.sh"

    def healthy() -> bool:
        return env_sh.exists() and http_ok(
            f"{base}/api/v2/monitor/health",
            lambda r: all(v.get("status") == "healthy" for v in r.json().values()),
        )

    pg = LocalPostgres(tmp_path / "mlops" / "postgres")
    try:
        with running(
            [mlops, "airflow"],
            env,
            tmp_path / "standalone.log",
            healthy,
            300,
            "mlops airflow",
            stop_timeout=90,
        ):
            # What a user's other shell gets from `source mlops-env.sh`.
            cli_env = {**env, **_sourced(env_sh)}
            assert cli_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
            db_pid = pg.daemon.pid()
            assert db_pid is not None
            yield {
                "env": cli_env,
                "airflow": str(Path(sys.executable).parent / "airflow"),
                "base": base,
                "home": tmp_path,
            }
        assert pg.daemon.pid() is None and not alive(db_pid), "PostgreSQL was left running"
        left = _airflow_processes(tmp_path)
        assert left == [], f"left running after mlops airflow stopped: {left}"
    finally:
        stop_all(tmp_path / "mlops" / "serving")
        pg.stop()


def _sourced(env_sh: Path) -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f"source {env_sh} && env -0"], capture_output=True, check=True
    ).stdout.decode()
    return dict(kv.split("=", 1) for kv in out.split("\0") if kv.startswith("AIRFLOW"))


def _airflow_processes(home: Path) -> list[str]:
    """Processes whose environment names this test's AIRFLOW_HOME (Airflow renames its
    processes, so their command lines do not say)."""
    import psutil

    want = f"AIRFLOW_HOME={home / 'airflow'}"
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                if want.encode() in fh.read().split(b"\0"):
                    found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])}")
        except OSError:
            continue
    return found


def _token(a: dict, timeout: float = 120) -> dict[str, str]:
    """A bearer token; right after start-up the password file or the endpoint may lag."""
    pw_file = Path(a["env"]["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            password = json.loads(pw_file.read_text())["admin"]
            r = requests.post(
                f"{a['base']}/auth/token",
                json={"username": "admin", "password": password},
                timeout=30,
            )
            if r.ok:
                return {"Authorization": f"Bearer {r.json()['access_token']}"}
            last = f"{r.status_code} {r.text[:300]}"
        except (OSError, ValueError, KeyError, requests.RequestException) as exc:
            last = repr(exc)
        time.sleep(2)
    raise AssertionError(f"no API token within {timeout} s: {last}")


def _runs(a: dict, headers: dict[str, str], dag_id: str = DAG_ID) -> list[dict]:
    r = requests.get(
        f"{a['base']}/api/v2/dags/{dag_id}/dagRuns",
        headers=headers,
        params={"limit": 100},
        timeout=30,
    )
    r.raise_for_status()
    return list(r.json()["dag_runs"])


def _wait(  # type: ignore[no-untyped-def]
    a: dict, headers: dict[str, str], pred, timeout: float, dag_id: str = DAG_ID
) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(a, headers, dag_id)
        if pred(runs):
            return runs
        time.sleep(5)
    raise AssertionError(f"timed out; runs: {[(r['dag_run_id'], r['state']) for r in runs]}")


def _trigger(a: dict, headers: dict[str, str], conf: dict, dag_id: str = DAG_ID) -> str:
    """A run through the REST API with params, as the UI's trigger form does; its run id."""
    r = requests.post(
        f"{a['base']}/api/v2/dags/{dag_id}/dagRuns",
        headers=headers,
        json={"logical_date": None, "conf": conf},
        timeout=30,
    )
    r.raise_for_status()
    return str(r.json()["dag_run_id"])


def _finished(
    a: dict, headers: dict[str, str], run_id: str, timeout: float, dag_id: str = DAG_ID
) -> dict:
    runs = _wait(
        a,
        headers,
        lambda rs: any(x["dag_run_id"] == run_id and x["state"] in DONE for x in rs),
        timeout,
        dag_id,
    )
    return next(x for x in runs if x["dag_run_id"] == run_id)


def _task(a: dict, headers: dict[str, str], run_id: str, task_id: str) -> dict:
    r = requests.get(
        f"{a['base']}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}",
        headers=headers,
        timeout=30,
    )
    r.raise_for_status()
    return dict(r.json())


def _recorded(store, day: str, run_id: str, task_id: str, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    """A task's result as the run writes it to the lake, once it is there."""
    key = f"reports/{DAG_ID}/{day}/{run_id}/{task_id}.json"
    deadline = time.monotonic() + timeout
    while not store.exists(key):
        assert time.monotonic() < deadline, f"{key} was not written within {timeout} s"
        time.sleep(2)
    return dict(json.loads(store.read_text(key)))


def _kill_mid_analysis(  # type: ignore[no-untyped-def]
    a: dict, headers: dict[str, str], settings, run_id: str, version: str
) -> int:
    """SIGKILL monitor_canary's task process once the analysis has judged a window and not yet
    decided (what an OOM kill or a lost node does); the number of windows judged by then."""
    import os
    import signal

    import psutil

    from pipelines import stages

    deadline = time.monotonic() + 900
    while True:
        assert time.monotonic() < deadline, "the canary analysis never got under way"
        verdict = stages.canary_verdict(settings, version)
        if verdict and verdict["windows"]:
            assert verdict["phase"] == "judging", f"decided before the kill: {verdict['reason']}"
            break
        time.sleep(0.3)
    ti = _task(a, headers, run_id, "monitor_canary")
    title = f"airflow worker -- {ti['id']}"  # the task process names itself so
    # setproctitle writes the title over argv: the first argument, padded with empty ones.
    procs = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0] == title]
    assert procs, f"no process titled {title!r}"
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    return len(verdict["windows"])


def _cli(a: dict, *args: str) -> None:
    """Run the airflow CLI; a failure shows what the CLI said."""
    out = subprocess.run(
        [a["airflow"], *args], env=a["env"], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        said = out.stdout[-3000:] + out.stderr[-3000:]
        raise AssertionError(f"airflow {' '.join(args)}: {said}")


def _wait_for_dag(a: dict, headers: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.get(f"{a['base']}/api/v2/dags/{DAG_ID}/details", headers=headers, timeout=30)
        if r.status_code == 200:
            return
        time.sleep(2)
    raise AssertionError(f"{DAG_ID} was not parsed within {timeout} s: {r.status_code} {r.text}")


@pytest.mark.timeout(3600)
def test_backfill_rest_triggers_a_killed_canary_and_a_retrain_under_the_scheduler(
    airflow: dict,
) -> None:
    from pipelines import stages
    from pipelines.config import load_settings
    from pipelines.registry import Registry

    env = airflow["env"]
    settings = load_settings(env)
    for day in DAYS:
        # Undrifted days: the monitoring step's traffic at drift 1.0 is then unlike the
        # champion's training data by the generator's whole range.
        stages.generate_data(settings, day, rows=12000)
    reg = Registry(settings.mlflow)
    assert reg.alias_version("champion") is None

    # 1. A backfill of several days from the CLI; the scheduler runs it. "Healthy" does not mean the
    # dag-processor has parsed the DAG yet, and the CLI needs it serialized: wait for the API to
    # know it. New DAGs start paused, and the scheduler runs nothing of a paused DAG; unpausing
    # also schedules the latest interval, which fails at validation (no data landed for it)
    # and is ignored here.
    headers = _token(airflow)
    _wait_for_dag(airflow, headers, timeout=240)
    _cli(airflow, "dags", "unpause", DAG_ID)
    _cli(
        airflow,
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        DAYS[0],
        "--to-date",
        DAYS[-1],
        "--max-active-runs",
        "1",
    )
    runs = _wait(
        airflow,
        headers,
        lambda rs: sum(r["run_type"] == "backfill" and r["state"] in DONE for r in rs) >= len(DAYS),
        timeout=1500,
    )
    backfills = [r for r in runs if r["run_type"] == "backfill"]
    assert [r["state"] for r in backfills] == ["success"] * len(DAYS), backfills
    versions = set()
    from pipelines.store import open_store

    store = open_store(settings.store)
    for r in backfills:
        day = r["data_interval_start"][:10]
        prefix = f"reports/{DAG_ID}/{day}/{r['dag_run_id']}"
        shard = json.loads(store.read_text(f"{prefix}/shard_dataset.json"))
        register = json.loads(store.read_text(f"{prefix}/register_model.json"))
        assert register["rollout"]["roll_out"] is False  # backfills never roll out
        assert (
            "NO: a backfill registers history and never rolls out"
            in (register["rollout"]["reasons"])
        )
        assert not store.exists(f"{prefix}/stage_canary.json")
        versions.add(shard["data_version"])
    assert sorted(r["data_interval_start"][:10] for r in backfills) == DAYS
    assert len(versions) == len(DAYS)
    assert reg.alias_version("champion") is None  # unchanged
    assert stages.serving_state(settings)["labels"] == {}

    # Unpausing also queued a run for the latest scheduled interval, a day with no data: it
    # is skipped with its reason, never a red run.
    scheduled = [r for r in runs if r["run_type"] == "scheduled"]
    assert scheduled and all(r["state"] in ("success", "running", "queued") for r in scheduled)

    # 2. Trigger through the REST API with params, as the UI's trigger form does.
    conf = {"date": DAYS[-1], "epochs": 6, "canary_steps": [50, 100]}
    run_id = _trigger(airflow, headers, conf)
    run = _finished(airflow, headers, run_id, timeout=900)
    assert run["state"] == "success", run
    assert run["conf"] == conf
    prefix = f"reports/{DAG_ID}/{DAYS[-1]}/{run_id}"
    trained = json.loads(store.read_text(f"{prefix}/train_model.json"))
    # The param wins over the environment (MLOPS__TRAIN__EPOCHS=3).
    assert reg.get_run(trained["run_id"]).data.params["epochs"] == "6"
    promoted = json.loads(store.read_text(f"{prefix}/promote.json"))
    assert promoted["decision"] == "promoted"
    assert reg.alias_version("champion") == promoted["aliases"]["champion"]
    for r in _runs(airflow, headers):
        if r["run_type"] == "scheduled":
            assert r["state"] == "success", r  # skipped for want of data, not failed
            gate = json.loads(
                store.read_text(
                    f"reports/{DAG_ID}/{r['data_interval_start'][:10]}/{r['dag_run_id']}/"
                    "validate_data.json"
                )
            )
            assert gate["status"] == "no_data", gate

    # 3. Live traffic unlike the champion's training data (its day drawn at drift 1.0); the
    # monitoring DAG, triggered for this hour, finds the drift and queues a retrain on the
    # latest landed day, a day the backfill already trained with the same config: the
    # scheduler runs it as a new training run (not the backfill's cached one), a new version,
    # judged by the canary to a verdict over several pokes.
    from pipelines.monitoring.traffic import send

    champion = reg.alias_version("champion")
    now = datetime.datetime.now(datetime.UTC)
    if now.minute == 59 and now.second > 30:  # the traffic and the judged hour are one hour
        time.sleep(61 - now.second)
    send(settings, DAYS[-1], rate=200, requests=600, drift=1.0)
    now = datetime.datetime.now(datetime.UTC)
    _cli(airflow, "dags", "unpause", MONITOR_DAG_ID)
    hour_conf = {"date": now.date().isoformat(), "hour": now.hour, "ship_open_hour": True}
    monitor_run = _trigger(airflow, headers, hour_conf, MONITOR_DAG_ID)
    run = _finished(airflow, headers, monitor_run, 600, MONITOR_DAG_ID)
    assert run["state"] == "success", run
    monitored = json.loads(
        store.read_text(f"reports/{MONITOR_DAG_ID}/{hour_conf['date']}/{monitor_run}/monitor.json")
    )
    assert monitored["retrain"], monitored["decision"]
    retrain_id = monitored["retrain_run_id"]
    assert monitored["retrain_conf"]["date"] == DAYS[-1]  # the latest landed day
    run = _finished(airflow, headers, retrain_id, 1500)
    assert run["state"] == "success", run
    assert run["conf"]["reason"].startswith("monitoring ")
    prefix = f"reports/{DAG_ID}/{DAYS[-1]}/{retrain_id}"
    trained = json.loads(store.read_text(f"{prefix}/train_model.json"))
    backfilled = next(r for r in backfills if r["data_interval_start"].startswith(DAYS[-1]))
    cached = json.loads(
        store.read_text(f"reports/{DAG_ID}/{DAYS[-1]}/{backfilled['dag_run_id']}/train_model.json")
    )
    assert trained["run_id"] != cached["run_id"]  # a new training run, not the cached one
    assert (
        reg.get_run(trained["run_id"]).data.tags["mlops.trigger_reason"].startswith("monitoring ")
    )
    retrained = json.loads(store.read_text(f"{prefix}/register_model.json"))["model_version"]
    assert retrained is not None and int(retrained) > int(champion)
    verdict = stages.canary_verdict(settings, retrained)
    assert verdict is not None and verdict["phase"] == "decided", verdict
    _judged(verdict)
    assert len(verdict["windows"]) >= 2, verdict  # judged over several pokes
    print(f"retrain: v{retrained} {verdict['decision']}: {verdict['reason']}")

    # 4. A drifted day triggered by a user: the challenger's canary analysis runs under the
    # scheduler, and its sensor's task process is SIGKILLed mid-analysis. The retried attempt
    # resumes the analysis from the lake, and the judge reaches the verdict.
    stages.generate_data(settings, DRIFTED_DAY, rows=12000, drift=1.0)
    run_id = _trigger(airflow, headers, {"date": DRIFTED_DAY, "epochs": 6})
    registered = _recorded(store, DRIFTED_DAY, run_id, "register_model", 900)
    version = registered["model_version"]
    assert version is not None, registered["rollout"]
    judged_before = _kill_mid_analysis(airflow, headers, settings, run_id, version)
    run = _finished(airflow, headers, run_id, timeout=1200)
    assert run["state"] == "success", run
    verdict = stages.canary_verdict(settings, version)
    assert verdict is not None and verdict["phase"] == "decided", verdict
    _judged(verdict)
    assert len(verdict["windows"]) > judged_before  # the evidence was kept, and more judged
    assert _task(airflow, headers, run_id, "monitor_canary")["try_number"] >= 2
    prefix = f"reports/{DAG_ID}/{DRIFTED_DAY}/{run_id}"
    ended = [t for t in ("promote", "rollback") if store.exists(f"{prefix}/{t}.json")]
    assert ended == ["promote" if verdict["decision"] == "promote" else "rollback"], ended
    print(f"drifted day: v{version} {verdict['decision']}: {verdict['reason']}")


def _judged(verdict: dict) -> None:
    """A verdict the judge reached from evidence: not the fallback of an analysis that never
    finished, and not a window's monitoring failure."""
    assert verdict["decision"] in ("promote", "rollback")
    assert verdict["windows"], verdict
    assert "reached no verdict" not in verdict["reason"], verdict["reason"]
    assert not verdict["reason"].startswith("monitoring failed"), verdict["reason"]
