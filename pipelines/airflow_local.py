"""Airflow on this machine: its metadata DB on a real PostgreSQL that the project starts and
stops itself (``metadata_db``, shared by ``mlops airflow``, ``mlops demo`` and the UI check), and
``mlops airflow`` (``make airflow``): ``airflow standalone`` with this project's DAGs.

Not SQLite: a running scheduler and a second writer (``airflow backfill create``, a REST
trigger, ``airflow dags unpause``) make SQLite answer "database is locked" at once whenever one
transaction would wait on another. Airflow runs on PostgreSQL in production for this reason.
The demo and ``make airflow`` share ``MLOPS_HOME/postgres``, so the UI shows the demo's runs.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.config import Settings
from pipelines.postgres import LocalPostgres, masked
from pipelines.processes import run_group
from pipelines.serving.daemon import check_port_free

CONN = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
TRAINING_POOL = ("mlops_training", "4", "concurrent training jobs")
SENSOR_POOL = ("mlops_sensors", "4", "poking sensors: canary analyses, serving-log waits")


def postgres(home: str | Path, port: int = 0) -> LocalPostgres:
    """The home's PostgreSQL (``MLOPS_HOME/postgres``; ``postgres.port``)."""
    return LocalPostgres(Path(home) / "postgres", port=port, setting="postgres.port")


@contextmanager
def metadata_db(home: str | Path, env: dict[str, str], port: int = 0) -> Iterator[dict[str, str]]:
    """``env`` with Airflow's metadata DB set: the home's PostgreSQL, started for the duration
    and stopped after (on success, failure or Ctrl-C), its ``airflow`` database created once.
    A ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` already pointing at a server (not SQLite) is kept,
    and nothing is started."""
    given = env.get(CONN, "")
    if given and not given.startswith("sqlite"):
        yield env
        return
    with postgres(home, port) as pg:
        yield {**env, CONN: pg.create_database("airflow")}


def env_file(env: dict[str, str], home: Path) -> Path:
    """``<AIRFLOW_HOME>/mlops-env.sh``: the ``AIRFLOW*`` settings this Airflow runs with, for
    ``airflow`` commands in another shell (``source`` it). It holds the database password, so
    it is readable by its owner only, and it is written atomically."""
    path = Path(env.get("AIRFLOW_HOME", home / "airflow")) / "mlops-env.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k.startswith("AIRFLOW")
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# Written by `mlops airflow`; source it to run airflow commands against it.\n")
        fh.write("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def standalone(settings: Settings, environ: dict[str, str] | None = None) -> int:
    """Start PostgreSQL (``postgres.port``), migrate Airflow's DB, create the training pool,
    then run ``airflow standalone`` in the foreground until it exits or is interrupted. Every
    Airflow process, the local model servers and Envoy its tasks started, and the database are
    stopped before this returns."""
    from pipelines import stages

    env = dict(os.environ if environ is None else environ)
    airflow = str(Path(sys.executable).parent / "airflow")
    # `airflow standalone` starts its components as `airflow ...` from PATH: this venv's.
    env["PATH"] = os.pathsep.join([str(Path(airflow).parent), env.get("PATH", "")])
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    api_port = int(env.setdefault("AIRFLOW__API__PORT", "8080"))
    env.setdefault("AIRFLOW__API__HOST", "127.0.0.1")
    env.setdefault(
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{api_port}/execution/"
    )
    check_port_free(
        env["AIRFLOW__API__HOST"],
        api_port,
        "AIRFLOW__API__PORT",
        hint="set AIRFLOW__API__PORT to a free port",
    )
    # A terminated launcher (SIGTERM) cleans up as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        with metadata_db(home, env, settings.postgres.port) as env:
            return _run(airflow, env, home)
    finally:
        stages.stop_local_serving(settings)


def _run(airflow: str, env: dict[str, str], home: Path) -> int:
    print(f"Airflow's metadata DB: {masked(env[CONN])}")
    print(f"For airflow commands in another shell: source {env_file(env, home)}")
    setup = (["db", "migrate"], ["pools", "set", *TRAINING_POOL], ["pools", "set", *SENSOR_POOL])
    for cmd in setup:
        code = run_group([airflow, *cmd], env, home / "airflow-setup.log", timeout=600)
        if code != 0:
            print(f"airflow {cmd[0]} failed (exit {code}); see {home / 'airflow-setup.log'}")
            return code
    for line in start_queued_work(airflow, env, home / "airflow-setup.log"):
        print(line)
    airflow_home = Path(env.get("AIRFLOW_HOME", home / "airflow"))
    print(
        "Login: admin, password in "
        f"{airflow_home / 'simple_auth_manager_passwords.json.generated'}; Ctrl-C stops "
        "Airflow, the model servers its runs started, and its database.",
        flush=True,
    )
    try:
        return run_group([airflow, "standalone"], env, None, timeout=None, stop_timeout=60)
    except KeyboardInterrupt:
        return 130


def paused_and_queued(conn_url: str) -> tuple[list[str], dict[str, list[str]]]:
    """This metadata DB's paused DAGs, and the queued runs of each DAG (an empty DB, before
    Airflow has parsed anything, has neither)."""
    import sqlalchemy as sa

    engine = sa.create_engine(conn_url)
    try:
        with engine.connect() as c:
            tables = set(sa.inspect(c).get_table_names())
            if not {"dag", "dag_run"} <= tables:
                return [], {}
            paused = [r[0] for r in c.execute(sa.text("SELECT dag_id FROM dag WHERE is_paused"))]
            queued: dict[str, list[str]] = {}
            for dag_id, run_id in c.execute(
                sa.text("SELECT dag_id, run_id FROM dag_run WHERE state = 'queued' ORDER BY id")
            ):
                queued.setdefault(dag_id, []).append(run_id)
    finally:
        engine.dispose()
    return sorted(paused), queued


def start_queued_work(airflow: str, env: dict[str, str], log_file: Path) -> list[str]:
    """Unpause each paused DAG that has queued runs (what ``mlops demo`` queued: the retrain its
    monitoring run asked for), so the scheduler runs them; say so, and which DAGs stay paused.
    An unpaused daily DAG also gets a run for its latest interval; one whose data has not
    landed is skipped with its reason, and it never holds up the queued run for long."""
    paused, queued = paused_and_queued(env[CONN])
    lines = []
    for dag_id in sorted(set(paused) & set(queued)):
        if run_group([airflow, "dags", "unpause", dag_id], env, log_file, timeout=300) == 0:
            paused.remove(dag_id)
            runs = queued[dag_id]
            lines.append(f"Unpaused {dag_id}: {len(runs)} queued run(s) ({', '.join(runs)}).")
    if paused:
        lines.append(
            f"Paused (nothing runs until you unpause it, in the UI or with `airflow dags "
            f"unpause <dag_id>`): {', '.join(paused)}."
        )
    return lines
