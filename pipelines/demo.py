"""``mlops demo``: the main job on embedded defaults, through real Airflow, with a summary.

Day 1 trains and deploys the first model; day 2 (drifted data) trains a challenger and takes it
through evaluation, registration and the canary; day 3 lands a defective batch that the gate
blocks and quarantines, leaving the champion and serving untouched. Then the champion scores
the last accepted day (``mlops_batch_scoring``), and live traffic unlike its training data goes
through the data plane for ``mlops_model_monitoring`` to judge this hour: it finds the drift
and queues a retraining run. Each day is one
``airflow dags test --use-executor`` run of ``mlops_training_pipeline`` (SQLite metadata DB under
MLOPS_HOME): each task runs as Airflow runs it, in a LocalExecutor worker that writes its task log
where ``make airflow``'s UI reads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.airflow_local import env_file, metadata_db
from pipelines.processes import run_group

DAG_ID = "mlops_training_pipeline"
SCORING_DAG_ID = "mlops_batch_scoring"
MONITORING_DAG_ID = "mlops_model_monitoring"
# Live requests unlike the champion's data, at LIVE_RATE a second: most of the judged hour's
# stable traffic, which also holds the day's rollout replays (about 2,700 when day 2's canary
# ran, of the champion's own distribution once it was promoted).
LIVE_REQUESTS, LIVE_RATE = 5000, 400
REPO = Path(__file__).resolve().parents[1]


def airflow_env(home: str) -> dict[str, str]:
    """Environment for Airflow CLI calls: everything under MLOPS_HOME, no example DAGs (the
    metadata DB is set by ``airflow_local.metadata_db``)."""
    dags = os.environ.get("MLOPS_DAGS_FOLDER", str(REPO / "dags"))
    plugins = os.environ.get("MLOPS_PLUGINS_FOLDER", str(REPO / "plugins"))
    venv_bin = str(Path(sys.executable).parent)
    airflow_home = os.environ.get("AIRFLOW_HOME", str(Path(home) / "airflow"))
    return {
        **os.environ,
        "MLOPS_HOME": home,
        "AIRFLOW_HOME": airflow_home,
        "AIRFLOW__CORE__DAGS_FOLDER": dags,
        "AIRFLOW__CORE__PLUGINS_FOLDER": plugins,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH")) if p),
    }


def executor_env(env: dict[str, str], api_port: int) -> dict[str, str]:
    """Task processes under a LocalExecutor report to an API server on loopback: Airflow's own
    path, so every task writes its log file (``dags test`` alone runs tasks in-process and leaves
    the UI's log pages empty). The JWT secret lives only as long as the demo."""
    return {
        **env,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Workers are forked per task; the DAG is mostly a chain and training uses both cores.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
    }


def api_port(environ: dict[str, str]) -> int:
    """``AIRFLOW__API__PORT`` when set (checked free), else any free loopback port: this API
    server only serves the demo's own task processes."""
    from pipelines.ports import free_port
    from pipelines.serving.daemon import check_port_free

    raw = environ.get("AIRFLOW__API__PORT")
    if not raw:
        return free_port()
    port = int(raw)
    check_port_free(
        "127.0.0.1",
        port,
        "AIRFLOW__API__PORT",
        hint="set AIRFLOW__API__PORT to a free port, or unset it for any free port",
    )
    return port


def start_api_server(directory: Path, env: dict[str, str]) -> Any:
    """``airflow api-server`` for the demo's task processes, in its own session (the caller
    stops it); healthy once its health endpoint answers."""
    import requests

    from pipelines.serving.daemon import LocalDaemon

    port = int(env["AIRFLOW__API__PORT"])

    def healthy(_: dict[str, Any]) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2).ok
        except requests.RequestException:
            return False

    daemon = LocalDaemon(directory, "airflow-api-server")
    airflow = str(Path(sys.executable).parent / "airflow")
    daemon.start([airflow, "api-server"], healthy, timeout=240, env=env, port_info={"port": port})
    return daemon


# A demo day takes one to two minutes here; a run that hangs is stopped, not waited for.
DAY_TIMEOUT_S = 1800.0


def run_reports(store: Any, date: str, dag_id: str = DAG_ID) -> dict[str, Any]:
    """Task results of the latest DAG run for a date (written by each task)."""
    from pipelines.data import layout

    prefix = f"{layout.run_report(dag_id, date)}"
    runs = [k for k in store.list(prefix)]
    if not runs:
        return {}
    latest = max(
        runs,
        key=lambda k: max((store.modified(f) for f in store.list(k)), default=0),
    )
    return {
        k.rsplit("/", 1)[-1].removesuffix(".json"): json.loads(store.read_text(k))
        for k in store.list(latest)
    }


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summarize(
    days: list[tuple[str, str, dict[str, Any]]], aliases: dict[str, str], serving: dict[str, Any]
) -> str:
    """The demo's closing table, one column per day."""
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, fn: Any) -> None:
        cells = []
        for _, _, r in days:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError, IndexError):
                cells.append("-")
        rows.append((name, cells))

    def validation(r: dict[str, Any]) -> str:
        v = r["validate_data"]
        warned = sorted({w.split(":", 1)[1] for w in v.get("warnings", [])})
        return f"{v['rows']} rows, {v['status']}" + (f" ({', '.join(warned)})" if warned else "")

    def blocked(r: dict[str, Any]) -> str:
        v = r["validate_data"]
        if v["status"] != "blocked":
            return "0"
        failed = [
            f"{c['check'].removeprefix('expect_')}({c['column']})"
            for c in v["checks"]
            if not c["success"] and c["severity"] == "block"
        ]
        return f"{v['rows']} -> quarantine: " + ", ".join(failed[:2])

    row("validation", validation)
    row("rows blocked", blocked)
    row(
        "data version / shards",
        lambda r: f"{r['shard_dataset']['data_version']} / {r['shard_dataset']['shards']}",
    )
    row(
        "train loss / samples/s",
        lambda r: (
            f"{r['train_model']['metrics']['train_loss']:.4f} / "
            f"{r['train_model']['metrics']['samples_per_s']:.0f}"
        ),
    )
    row(
        "world size / val AUC",
        lambda r: (
            f"{r['train_model']['metrics']['world_size']:.0f} / "
            f"{r['train_model']['metrics']['val_auc']:.4f}"
        ),
    )

    def evaluation(r: dict[str, Any]) -> str:
        e = r["evaluate_model"]
        verdict = "BLESSED" if e["blessed"] else "REJECTED"
        if e["auc_delta"] is None:
            return f"{verdict}: AUC {e['roc_auc']:.4f}, no champion"
        lo, hi = e["auc_delta_ci"]
        return (
            f"{verdict}: AUC {e['roc_auc']:.4f}, delta {e['auc_delta']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] vs v{e['champion_version']}"
        )

    row("evaluation", evaluation)
    row("model version", lambda r: _fmt(r["register_model"]["model_version"]))
    row("infra p99 ms", lambda r: _fmt(r["export_and_infra_validate"]["p99_ms"], 1))

    def shadow(r: dict[str, Any]) -> str:
        sh = r["shadow_candidate"]
        if sh["verdict"] == "skipped":
            return "skipped (first deployment)" if "first" in sh["reasons"][0] else "skipped"
        st = sh.get("stats") or {}
        exp = st.get("expected") or {}
        # Live paired answers against what evaluation expected of the pair.
        return (
            f"{sh['verdict']} ({sh['pairs']} pairs; agreement {_fmt(st.get('agreement'))} vs "
            f"{_fmt(exp.get('agreement'))}, rank corr {_fmt(st.get('rank_correlation'), 3)} vs "
            f"{_fmt(exp.get('rank_correlation'), 3)} expected)"
        )

    row("shadow verdict", shadow)

    def canary(r: dict[str, Any]) -> str:
        m = r["monitor_canary"]
        if not m["windows"]:
            if m["reason"].startswith("first deployment"):
                return f"{m['decision']} (first deployment)"
            if m["reason"].startswith("shadow"):
                return f"{m['decision']} (stopped by the shadow stage)"
            return f"{m['decision']} (before any window: {m['reason'][:40]})"
        ev = ((m.get("last_window") or {}).get("evidence") or {}).get("score_drift") or {}
        scores = (
            f"; P(canary > stable) {ev['p_superiority']:.3f} vs {ev['expected']:.3f} expected"
            if ev.get("p_superiority") is not None and ev.get("expected") is not None
            else ""
        )
        return f"{m['decision']} ({m['windows']} windows{scores})"

    row("canary verdict", canary)
    row(
        "outcome",
        lambda r: (r.get("promote") or r.get("rollback") or {"decision": "-"})["decision"],
    )
    width = max(len(n) for n, _ in rows)
    cols = [
        max(len(title), *(len(cells[i]) for _, cells in rows))
        for i, (title, _, _) in enumerate(days)
    ]
    out = [
        f"{'':{width}} | " + " | ".join(f"{t:{w}}" for (t, _, _), w in zip(days, cols, strict=True))
    ]
    out.append("-" * len(out[0]))
    for name, cells in rows:
        out.append(
            f"{name:{width}} | " + " | ".join(f"{c:{w}}" for c, w in zip(cells, cols, strict=True))
        )
    out.append("")
    out.append(f"MLflow aliases: {aliases}")
    out.append(
        f"Serving: labels {serving['labels']}, versions per pool {serving['versions']}, "
        f"canary weight {serving['canary_weight']:.0f}%"
    )
    topo = serving.get("topology") or {}
    if topo:
        out.append(f"Topology: client -> Envoy {topo.get('data_plane')} ->")
        for label, urls in topo.get("replicas", {}).items():
            out.append(f"  {label}: {len(urls)} replicas {', '.join(urls)}")
        if topo.get("access_log"):
            out.append(f"  access log {topo['access_log']}, stats {topo.get('admin')}/stats")
    return "\n".join(out)


def dags_test(
    airflow: str,
    dag_id: str,
    date: str,
    env: dict[str, str],
    log_file: Path,
    conf: dict[str, Any] | None = None,
) -> int:
    """One ``airflow dags test --use-executor`` run for ``date`` (its whole process group
    stopped after, within the day's timeout); its exit code. The day goes in the conf, as a
    user's trigger with a date does: the run's logical date is now, so the UI shows its real
    start and duration (``dags test`` records a given logical date as the start).

    Once the run has finished, ``dags test`` shuts its LocalExecutor down, and that can hang
    for good: a worker that never gets its shutdown message is joined without a timeout
    (apache/airflow#67870; seen here under load, the run done and the command still waiting
    15 minutes later). A command still running a minute after its run finished is stopped, and
    the run's own final state gives the exit code."""
    offset = log_file.stat().st_size if log_file.exists() else 0
    return run_group(
        [
            airflow,
            "dags",
            "test",
            "--use-executor",
            dag_id,
            "-c",
            json.dumps({"date": date, **(conf or {})}),
        ],
        env,
        log_file,
        DAY_TIMEOUT_S,
        finished=lambda: run_finished(log_file, offset),
    )


def run_finished(log_file: Path, offset: int = 0) -> int | None:
    """From a ``dags test`` log (past ``offset``): None while its run is not finished, else 0
    for a successful run and 1 for any other final state."""
    try:
        with open(log_file, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    at = text.find("DagRun Finished:")
    if at < 0:
        return None
    line = text[at:].split("\n", 1)[0]
    return 0 if " state=success" in line else 1


def _score_last_accepted_day(
    store: Any,
    days: list[tuple[str, str, dict[str, Any]]],
    airflow: str,
    env: dict[str, str],
    logs: Path,
) -> dict[str, Any] | None:
    """The batch-scoring DAG on the last day the gate accepted, with the champion; its
    published summary, or None (printed) when the run did not publish."""
    # The gate let these through (accepted, or accepted with warnings): their data landed.
    accepted = [
        d for _, d, r in days if r.get("validate_data", {}).get("status") in ("accepted", "warned")
    ]
    if not accepted:
        return None
    date = accepted[-1]
    log_file = logs / f"scoring-{date}.log"
    log_file.unlink(missing_ok=True)
    began = time.perf_counter()
    print(f"batch scoring: airflow dags test {SCORING_DAG_ID} {date} ...", end=" ", flush=True)
    code = dags_test(airflow, SCORING_DAG_ID, date, env, log_file)
    published = run_reports(store, date, SCORING_DAG_ID).get("publish")
    print(
        f"{'ok' if published else 'FAILED'} in {time.perf_counter() - began:.0f} s "
        f"(exit {code}, log {log_file})",
        flush=True,
    )
    return published


def _monitor_live_traffic(
    settings: Any,
    store: Any,
    days: list[tuple[str, str, dict[str, Any]]],
    drifts: dict[str, float],
    airflow: str,
    env: dict[str, str],
    logs: Path,
) -> dict[str, Any] | None:
    """Live traffic unlike the champion's training data through the data plane, then the
    monitoring DAG on this hour: its ``monitor`` result, or None (printed) when it failed."""
    from pipelines.monitoring.traffic import send
    from pipelines.registry import Registry

    champion = Registry(settings.mlflow).alias_version("champion")
    trained_on = next(
        (d for _, d, r in days if r.get("register_model", {}).get("model_version") == champion),
        None,
    )
    if trained_on is None:
        return None
    # Traffic unlike what the champion learnt: its own day drawn one unit of drift further than
    # it was (an undrifted champion sees drift 1, one trained on drift 1 sees drift 2).
    day, drift = trained_on, drifts.get(trained_on, 0.0) + 1.0
    now = dt.datetime.now(dt.UTC)
    if now.minute == 59 and now.second > 20:  # one hour's traffic, not two halves
        time.sleep(61 - now.second)
        now = dt.datetime.now(dt.UTC)
    date, hour = now.date().isoformat(), now.hour
    print(
        f"live traffic: {LIVE_REQUESTS} requests of {day} with drift {drift:g}, then "
        f"airflow dags test {MONITORING_DAG_ID} {date}T{hour:02d} ...",
        end=" ",
        flush=True,
    )
    began = time.perf_counter()
    send(settings, day, rate=LIVE_RATE, requests=LIVE_REQUESTS, drift=drift)
    log_file = logs / f"monitoring-{date}T{hour:02d}.log"
    log_file.unlink(missing_ok=True)
    conf = {"hour": hour, "ship_open_hour": True}  # the demo's hour is not over yet
    # The demo has one hour of live traffic to show: drift in one judged hour is sustained.
    one_hour = {**env, "MLOPS__MONITORING__DRIFT_HOURS": "1"}
    code = dags_test(airflow, MONITORING_DAG_ID, date, one_hour, log_file, conf)
    monitored = run_reports(store, date, MONITORING_DAG_ID).get("monitor")
    print(
        f"{'ok' if monitored else 'FAILED'} in {time.perf_counter() - began:.0f} s "
        f"(exit {code}, log {log_file})",
        flush=True,
    )
    return monitored


def monitoring_line(monitored: dict[str, Any], report: dict[str, Any]) -> str:
    """The monitoring verdicts for the summary: the hour's SLOs, drift and labels, and what
    the decision did."""
    d, m, f = monitored["decision"], report["metrics"], report["findings"]
    champ = m["versions"].get(str(d.get("champion"))) or {}
    lat = champ.get("latency_ms") or {}
    slo = f["slo"]
    pred = m["prediction"]
    perf = f.get("performance")
    lines = [
        f"Monitoring {d['hour']} (champion v{d.get('champion')}, "
        f"{m['labels'].get('stable', {}).get('instances', 0)} stable requests):",
        f"  SLO {slo['status']} (p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
        f"errors {champ.get('error_rate')}); features drifted: "
        f"{', '.join(m['features']['drifted']) or 'none'} ({m['features']['status']}); "
        f"scores: {pred.get('detail') or pred.get('status')}; labels: "
        + (
            "none landed"
            if perf is None
            else "refused"
            if perf.get("refused")
            else f"{perf['labelled']} matured"
        )
        + f"; serving log {(f.get('log') or {}).get('status', 'unknown')} (heartbeats)",
    ]
    if not d["actions"]:
        lines.append("  -> no action")
    lines += [f"  -> {a['kind']}: {a['reason']}" for a in d["actions"]]
    if monitored.get("retrain"):
        lines.append(
            f"  -> {DAG_ID} run {monitored['retrain_run_id']} queued with conf date="
            f"{monitored['retrain_conf']['date']} (a scheduler runs it: make airflow)"
        )
    lines += [f"  -> {n}" for n in d.get("notes", [])]
    return "\n".join(lines)


def run_demo(
    reset: bool = False,
    start: str = "2026-11-01",
    keep_serving: bool = False,
    skewed_export: bool = False,
    skip_shadow: bool = False,
) -> int:
    """The demo's days, then batch scoring and an hour of monitored live traffic.
    ``skewed_export``: day 2's challenger is published with a deliberate export fault
    (``serving.inject_export_skew``), which the shadow stage (or, with ``skip_shadow``, the
    canary) must stop; the champion stays."""
    import signal

    from pipelines import stages
    from pipelines.config import load_settings
    from pipelines.registry import Registry
    from pipelines.serving.daemon import DaemonUnavailable, PortInUse, stop_all
    from pipelines.store import open_store

    # A terminated demo (SIGTERM, as from a supervisor or CI) cleans up as Ctrl-C does: the
    # finally below stops what it started.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    settings = load_settings()
    home = Path(settings.home)
    if reset and home.exists():
        # What an earlier run left running in this home: serving, its Airflow API server, and
        # the metadata DB.
        stages.stop_local_serving(settings)
        stop_all(home / "demo")
        stop_all(home / "postgres")
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    if settings.serving.mode == "local":
        from pipelines.serving.dataplane.local import LocalPlane

        try:  # one clear sentence now, not a failed staging on day 1
            LocalPlane(
                settings.serving, settings.dataplane, settings.mlflow.model_name
            ).check_ports()
        except PortInUse as exc:
            print(exc, file=sys.stderr)
            return 2
    try:
        port = api_port(dict(os.environ))
    except PortInUse as exc:
        print(exc, file=sys.stderr)
        return 2
    logs = home / "demo"
    logs.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            env = stack.enter_context(
                metadata_db(
                    home, executor_env(airflow_env(str(home)), port), settings.postgres.port
                )
            )
        except PortInUse as exc:
            print(exc, file=sys.stderr)
            return 2
        env_file(env, home)
        airflow = str(Path(sys.executable).parent / "airflow")
        print(f"MLOPS_HOME={home}  (logs: {logs})", flush=True)
        t0 = time.perf_counter()
        if run_group([airflow, "db", "migrate"], env, logs / "airflow-db.log") != 0:
            print(f"airflow db migrate failed; see {logs / 'airflow-db.log'}", file=sys.stderr)
            return 3
        first = dt.date.fromisoformat(start)
        day2_env = {"MLOPS__SERVING__INJECT_EXPORT_SKEW": "true"} if skewed_export else {}
        day2_conf = {"skip_shadow": True} if skip_shadow else {}
        day2 = "day 2 (drift" + (", skewed export" if skewed_export else "")
        day2 += ", no shadow)" if skip_shadow else ")"
        plan = [
            ("day 1", first, 0.0, None, {}, {}),
            (day2, first + dt.timedelta(days=1), 1.0, None, day2_env, day2_conf),
            ("day 3 (bad batch)", first + dt.timedelta(days=2), 0.0, "pii", {}, {}),
        ]
        store = open_store(settings.store)
        days: list[tuple[str, str, dict[str, Any]]] = []
        ok = True
        api = None
        try:
            try:
                api = start_api_server(logs, env)
            except DaemonUnavailable as exc:
                print(f"The demo's Airflow API server did not start: {exc}", file=sys.stderr)
                return 3
            for title, day, drift, defect, day_env, conf in plan:
                date = day.isoformat()
                # The demo's days are its own: a run without --reset lands them again.
                stages.generate_data(settings, date, drift=drift, defect=defect, overwrite=True)
                log_file = logs / f"{date}.log"
                log_file.unlink(missing_ok=True)
                began = time.perf_counter()
                print(f"{title}: airflow dags test {DAG_ID} {date} ...", end=" ", flush=True)
                code = dags_test(airflow, DAG_ID, date, {**env, **day_env}, log_file, conf)
                reports = run_reports(store, date)
                expected_block = defect is not None
                blocked = reports.get("validate_data", {}).get("status") == "blocked"
                finished = "promote" in reports or "rollback" in reports
                good = (blocked and "shard_dataset" not in reports) if expected_block else finished
                took = f"{time.perf_counter() - began:.0f} s"
                if expected_block and good:
                    # The gate did its job: the run is failed on purpose (red in the UI).
                    outcome = f"blocked by the data gate, as planned, in {took} (run failed)"
                else:
                    outcome = f"{'ok' if good else 'FAILED'} in {took} (exit {code})"
                print(f"{outcome}; log {log_file}", flush=True)
                ok = ok and good
                days.append((title, date, reports))
                if not good:
                    break
            scoring = monitored = None
            if ok:
                scoring = _score_last_accepted_day(store, days, airflow, env, logs)
                ok = scoring is not None
            if ok:
                drifts = {d.isoformat(): drift for _, d, drift, *_ in plan}
                monitored = _monitor_live_traffic(settings, store, days, drifts, airflow, env, logs)
                ok = monitored is not None
            print()
            print(
                summarize(days, Registry(settings.mlflow).aliases(), stages.serving_state(settings))
            )
            if scoring is not None:
                print(
                    f"Batch scoring of {scoring['date']}: {scoring['rows']} rows by version "
                    f"{scoring['version']} on {scoring['runtime']} {scoring['variant']} "
                    f"({scoring['parts']} part(s)) -> {scoring['manifest_uri']}"
                )
            if monitored is not None:
                report = json.loads(store.read_text(store.key_of(monitored["report_uri"])))
                print(monitoring_line(monitored, report))
            print(
                f"\nTotal {time.perf_counter() - t0:.0f} s. MLflow UI: mlflow ui "
                f"--backend-store-uri {settings.mlflow.tracking_uri}\n"
                f"Airflow UI with these runs and their task logs: make airflow "
                f"(task logs under {Path(env['AIRFLOW_HOME']) / 'logs'})"
            )
        finally:
            # On success, failure and Ctrl-C: the API server, the replicas and Envoy run in their
            # own sessions, so nothing else would stop them.
            # One failing stop does not keep the other from running.
            try:
                if api is not None:
                    api.stop()
            finally:
                if not keep_serving:
                    stages.stop_local_serving(settings)
        return 0 if ok else 3
