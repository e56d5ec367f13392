"""The monitoring DAG end to end with ``dag.test()``: real replicas behind Envoy, real traffic
through the data plane, the hour's serving log shipped from Envoy's access log, and the
decision's actions taken by the DAG's own tasks.

A monitored hour is decided once, and the hour is the wall clock's, so each scenario gets its
own registered model name (everything the monitor keeps is keyed by it) and serving directory;
one model is trained for the module and registered under each scenario's name."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest

from pipelines import stages
from pipelines.config import Settings, settings
from pipelines.data import layout
from pipelines.data.generate import to_parquet_bytes
from pipelines.data.spec import load_spec
from pipelines.monitoring.traffic import day_requests, send
from pipelines.registry import CHAMPION, Registry
from pipelines.serving.daemon import stop_all
from pipelines.serving.dataplane.split import Split
from pipelines.store import open_store
from tests.model_helpers import home_settings
from tests.ports import FREE_PORTS
from tests.serving_helpers import doctored_saved_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DAY = "2026-11-01"
MONITOR = "mlops_model_monitoring"
TRAINING = "mlops_training_pipeline"
ENV = {
    **FREE_PORTS,
    "MLOPS__DATAPLANE__REPLICAS": "1",
    "MLOPS__TRAIN__NODES": "1",
    "MLOPS__TRAIN__EPOCHS": "3",
    "MLOPS__MONITORING__DRIFT_HOURS": "1",  # the streak over hours is the policy's unit test
}
# The doctored "slow" SavedModel answers in ~25 ms at 50 req/s here, the real one in ~2 ms.
SLOW_SLO = {"MLOPS__MONITORING__SLO_P50_MS": "12"}
REQUESTS = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One blessed, registered, exported model in a home whose MLflow every scenario uses."""
    home = tmp_path_factory.mktemp("monitoring") / "mlops"
    with home_settings(home, ENV) as s:
        stages.generate_data(s, DAY, rows=6000)
        stages.validate_data(s, DAY)
        run_id = stages.train(s, stages.shard_data(s, DAY)["manifest_uri"])["run_id"]
        assert stages.evaluate(s, run_id)["blessed"]
        version = stages.register(s, run_id)["model_version"]
        stages.export_and_infra_validate(s, version)
        yield {"home": home, "settings": s, "run_id": run_id, "version": version}


def _register_copy(s: Settings, base: dict[str, Any], kind: str = "same") -> str:
    """A version of the trained run under this scenario's model name, its SavedModel copied
    (or doctored) with the sha256 record the export stage writes."""
    import tempfile

    from pipelines.evaluate.run import load_run_model
    from pipelines.serving.rollout import _tree_sha256

    reg, store, name = Registry(s.mlflow), open_store(s.store), s.mlflow.model_name
    if not reg.client.search_registered_models(f"name = '{name}'"):
        reg.client.create_registered_model(name)
    mv = reg.client.create_model_version(
        name, source=f"runs:/{base['run_id']}/model", run_id=base["run_id"]
    )
    version = str(mv.version)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "saved_model"
        if kind == "same":
            store.get_dir(f"{layout.export('fraud_detector', base['version'])}/saved_model", out)
        else:
            doctored_saved_model(load_run_model(reg, base["run_id"]), out, kind)
        store.put_dir(out, f"{layout.export(name, version)}/saved_model")
        meta = {"version": version, "run_id": base["run_id"], "files": _tree_sha256(out)}
        store.write_text(f"{layout.export(name, version)}/export.json", json.dumps(meta))
    return version


@contextmanager
def scenario(trained: dict[str, Any], tmp_path: Path, **env: str) -> Iterator[Settings]:
    """This scenario's model name and serving directory (the lake and MLflow are the
    module's); v1, a copy of the trained model, deployed as stable and champion. Serving is
    stopped at the end."""
    serving = tmp_path / "serving"
    with pytest.MonkeyPatch.context() as local:
        local.setenv("MLOPS__SERVING__BASE_DIR", str(serving))
        local.setenv("MLOPS__MLFLOW__MODEL_NAME", f"fraud_{tmp_path.name[:24]}")
        for k, v in env.items():
            local.setenv(k, v)
        settings.cache_clear()
        s = settings()
        try:
            v1 = _register_copy(s, trained)
            stages.stage_canary(s, v1)
            stages.promote(s, v1)
            yield s
        finally:
            stop_all(serving)
            settings.cache_clear()


def run_monitor(date: str, hour: int) -> Any:
    from airflow.models import DagBag

    dags = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).dags
    return dags[MONITOR].test(
        logical_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        run_conf={"date": date, "hour": hour, "ship_open_hour": True},
    )


def this_hour() -> tuple[str, int]:
    """The hour traffic sent now falls in; waits out the last seconds of an hour, so a
    scenario's traffic never straddles two."""
    now = dt.datetime.now(dt.UTC)
    if now.minute == 59 and now.second > 30:
        time.sleep(61 - now.second)
        now = dt.datetime.now(dt.UTC)
    return now.date().isoformat(), now.hour


def task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def decision(s: Settings, date: str, hour: int) -> dict[str, Any]:
    from pipelines.monitoring.run import decision_key

    store = open_store(s.store)
    return json.loads(store.read_text(decision_key(s.mlflow.model_name, date, hour)))


def training_runs() -> list[Any]:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == TRAINING)).all()
        return [(r.run_id, dict(r.conf or {})) for r in runs]


def test_healthy_traffic_gives_no_action(
    airflow_db: None, trained: dict[str, Any], tmp_path: Path
) -> None:
    with scenario(trained, tmp_path) as s:
        date, hour = this_hour()
        sent = send(s, DAY, rate=200, requests=REQUESTS)
        assert sent["logged"] >= REQUESTS
        before = training_runs()
        dr = run_monitor(date, hour)
        assert str(dr.state) == "success", task_states(dr)
        d = decision(s, date, hour)
        assert d["actions"] == [] and d["judged"] and not d["drifted"], d
        states = task_states(dr)
        assert states["trigger_retraining"] == "skipped" and states["roll_back"] == "skipped"
        assert training_runs() == before
        store = open_store(s.store)
        shipped = json.loads(
            store.read_text(
                f"{layout.serving_logs(s.mlflow.model_name, date, hour)}/_manifest.json"
            )
        )
        # Every routed call of the hour: the traffic, and the staging's smoke test (canary).
        assert shipped["labels"]["stable"] == REQUESTS
        assert shipped["rows"] == sum(shipped["labels"].values())
        report = json.loads(store.read_text(store.key_of(d["report_uri"])))
        champion = report["metrics"]["versions"][report["champion"]]
        assert champion["labels"]["stable"] == REQUESTS and champion["slo"] == "pass", champion
        assert report["metrics"]["features"]["status"] == "judged"
        prefix = layout.monitoring(s.mlflow.model_name, date, hour)
        for name in ("report.md", "plots/drift.png", "plots/latency.png", "plots/scores.png"):
            assert store.exists(f"{prefix}/{name}"), name
        # The day's MLflow monitoring run: the hour as a step, its report and plots.
        reg = Registry(s.mlflow)
        run = reg.client.get_run(d["mlflow_run_id"])
        assert run.data.tags["mlops.run_key"] == f"monitoring:{s.mlflow.model_name}:{date}"
        p50 = reg.client.get_metric_history(d["mlflow_run_id"], "p50_ms")
        assert [m.step for m in p50] == [hour] and p50[0].value == champion["latency_ms"]["p50"]
        logged = {a.path for a in reg.client.list_artifacts(d["mlflow_run_id"], f"hour={hour:02d}")}
        assert f"hour={hour:02d}/drift.png" in logged and f"hour={hour:02d}/report.json" in logged
        # A rerun of the decided hour changes nothing and acts on nothing.
        again = run_monitor(date, hour)
        assert str(again.state) == "success" and decision(s, date, hour) == d
        assert shipped["coverage"]["status"] == "complete", shipped["coverage"]
        assert shipped["coverage"]["lines"] >= 1
        # Zero rows, two ways. The hour before this scenario's data plane first started was
        # not served: no traffic, no alert. Then the log is lost (moved away, as a broken
        # collector or a rotation without shipping would leave it): an earlier hour with no
        # heartbeat is an hour nobody saw, and that alerts instead of passing as quiet.
        earlier = dt.datetime.fromisoformat(f"{date}T{hour:02d}:00+00:00")
        quiet, lost = earlier - dt.timedelta(hours=1), earlier - dt.timedelta(hours=2)
        assert str(run_monitor(quiet.date().isoformat(), quiet.hour).state) == "success"
        d = decision(s, quiet.date().isoformat(), quiet.hour)
        assert d["actions"] == [] and not d["judged"], d
        access_log = Path(s.serving.base_dir) / "envoy-access.log"
        access_log.rename(access_log.with_name("rotated-away.log"))
        dr = run_monitor(lost.date().isoformat(), lost.hour)
        assert str(dr.state) == "success", task_states(dr)
        d = decision(s, lost.date().isoformat(), lost.hour)
        assert d["kinds"] == ["alert"] and not d["judged"], d
        assert d["actions"][0]["reason"].startswith("serving log missing"), d
        assert "did not arrive" in d["actions"][0]["reason"]


def test_drifted_traffic_alerts_and_triggers_retraining_with_the_right_conf(
    airflow_db: None, trained: dict[str, Any], tmp_path: Path
) -> None:
    with scenario(trained, tmp_path) as s:
        date, hour = this_hour()
        send(s, DAY, rate=200, requests=REQUESTS, drift=1.0)
        # A broken labels feed lands in the window too (a label of 2): it is refused and
        # alerted on, naming the file and the column, and the hour still decides on drift.
        store = open_store(s.store)
        outcomes = layout.outcomes("transactions", date)
        bad = pd.DataFrame({"transaction_id": ["t-1", "t-2"], "is_fraud": [0, 2]})
        store.write_bytes(f"{outcomes}/part-00000.parquet", to_parquet_bytes(bad))
        try:
            dr = run_monitor(date, hour)
        finally:  # the lake is the module's
            store.delete(outcomes, recursive=True)
        assert str(dr.state) == "success", task_states(dr)
        d = decision(s, date, hour)
        assert sorted(d["kinds"]) == ["alert", "retrain"] and d["drifted"], d
        actions = {a["kind"]: a["reason"] for a in d["actions"]}
        assert "sustained drift" in actions["retrain"]
        refused = actions["alert"]
        assert refused.startswith("labels refused: ") and "part-00000.parquet" in refused
        assert "label column 'is_fraud'" in refused, refused
        prefix = layout.monitoring(s.mlflow.model_name, date, hour)
        assert "Labels refused, nothing judged from them" in store.read_text(f"{prefix}/report.md")
        assert task_states(dr)["trigger_retraining"] == "success"
        runs = dict(training_runs())
        run_id = f"retrain__{s.mlflow.model_name}__{date}T{hour:02d}"
        assert run_id in runs, runs
        assert runs[run_id]["date"] == DAY  # the latest landing day
        assert "sustained drift" in runs[run_id]["reason"]
        # The conf is one the training DAG's form accepts as it is.
        from dags.mlops_training_pipeline import PARAMS

        assert set(runs[run_id]) <= set(PARAMS)


def test_a_slow_champion_just_promoted_is_rolled_back_to_the_previous_one(
    airflow_db: None, trained: dict[str, Any], tmp_path: Path
) -> None:
    with scenario(trained, tmp_path, **SLOW_SLO) as s:
        reg = Registry(s.mlflow)
        v1 = reg.alias_version(CHAMPION)
        v2 = _register_copy(s, trained, kind="slow")
        stages.stage_canary(s, v2)
        stages.promote(s, v2)  # a promotion the canary should have stopped
        assert reg.alias_version(CHAMPION) == v2
        date, hour = this_hour()
        send(s, DAY, rate=50, requests=REQUESTS)
        dr = run_monitor(date, hour)
        assert str(dr.state) == "success", task_states(dr)
        d = decision(s, date, hour)
        assert d["kinds"] == ["rollback"], d
        reason = d["actions"][0]["reason"]
        assert f"champion v{v2}" in reason and "median latency" in reason, reason
        assert task_states(dr)["roll_back"] == "success"
        assert reg.alias_version(CHAMPION) == v1
        assert stages.serving_state(s)["labels"] == {"stable": int(v1), "canary": int(v1)}
        assert stages.serving_state(s)["canary_weight"] == 0
        assert reg.version(v2).tags["mlops.rollout"] == "demoted"
        assert reason in reg.version(v2).tags["mlops.demoted_reason"]
        # A retry of the done restore finishes nothing new; a stale decision is refused.
        assert stages.restore_champion(s, v2, v1, reason)["decision"] == "already_restored"
        stale = stages.restore_champion(s, "99", v2, "a decision about v99")
        assert stale["decision"] == "refused" and "not v99" in stale["reason"]
        assert reg.alias_version(CHAMPION) == v1
        # Another change of serving in flight holds the lease (the training DAG staging a
        # canary): the restore waits for it, then is refused, naming it, and changes nothing.
        impatient = s.model_copy(
            update={"serving": s.serving.model_copy(update={"lease_wait_s": 0.5})}
        )
        with stages.serving_lease(s).hold("stage_canary v7 (the training DAG)"):
            busy = stages.restore_champion(impatient, v1, v2, "a decision taken meanwhile")
        assert busy["decision"] == "refused" and "stage_canary v7" in busy["reason"], busy
        assert reg.alias_version(CHAMPION) == v1
        assert stages.serving_state(s)["labels"] == {"stable": int(v1), "canary": int(v1)}
        from pipelines.audit import AuditLog

        events = [e["event"] for e in AuditLog(open_store(s.store)).entries()]
        assert "rollout.champion_restored" in events and "monitoring.decided" in events


def test_late_labels_showing_decay_trigger_retraining(
    airflow_db: None, trained: dict[str, Any], tmp_path: Path
) -> None:
    with scenario(trained, tmp_path) as s:
        date, hour = this_hour()
        send(s, DAY, rate=200, requests=REQUESTS)
        # The outcomes land: every answered row's true label, except that each row the
        # champion flags at its operating threshold turns out legitimate (fraud moved where
        # it no longer looks).
        from pipelines.evaluate.run import load_run_model
        from pipelines.evaluate.threshold import recorded
        from pipelines.train.model import predict_proba

        store = open_store(s.store)
        reg = Registry(s.mlflow)
        threshold = recorded(reg.get_run(trained["run_id"]).data.tags)
        assert threshold is not None and threshold < s.evaluate.threshold
        landed = pd.read_parquet(trained["home"] / "lake" / layout.landing("transactions", DAY))
        truth = dict(zip(landed["transaction_id"].astype(str), landed["is_fraud"], strict=True))
        sent = day_requests(s, load_spec("transactions"), DAY)[:REQUESTS]
        answered = [k for k, _ in sent]
        scores = predict_proba(
            load_run_model(reg, trained["run_id"]), pd.DataFrame([inst for _, inst in sent])
        )
        flagged = scores >= threshold
        assert flagged.any()
        labels = pd.DataFrame(
            {
                "transaction_id": answered,
                "is_fraud": [
                    0 if f else int(truth[k]) for k, f in zip(answered, flagged, strict=True)
                ],
            }
        )
        outcomes = layout.outcomes("transactions", date)
        store.write_bytes(f"{outcomes}/part-00000.parquet", to_parquet_bytes(labels))
        try:
            dr = run_monitor(date, hour)
        finally:  # the lake is the module's: other scenarios' answers have no such labels
            store.delete(outcomes, recursive=True)
        assert str(dr.state) == "success", task_states(dr)
        d = decision(s, date, hour)
        assert d["kinds"] == ["retrain"], d
        assert "decayed realised performance" in d["actions"][0]["reason"]
        assert "precision" in d["actions"][0]["reason"], d["actions"][0]["reason"]
        perf = d["actions"][0]["evidence"]["performance"]
        assert perf["labelled"] == REQUESTS and perf["decayed"]
        # Counted at the version's own threshold, as its evaluation was, not at 0.5.
        assert perf["threshold"] == threshold, perf


def test_a_monitor_run_during_a_canary_takes_no_action_on_the_canary(
    airflow_db: None, trained: dict[str, Any], tmp_path: Path
) -> None:
    with scenario(trained, tmp_path, **SLOW_SLO) as s:
        reg = Registry(s.mlflow)
        v1 = reg.alias_version(CHAMPION)
        v2 = _register_copy(s, trained, kind="slow")
        stages.stage_canary(s, v2)
        control = stages.serving_control(s)
        control.set_split(Split(50))
        before = stages.serving_state(s)
        date, hour = this_hour()
        send(s, DAY, rate=50, requests=2 * REQUESTS)  # half of it stable's, judged for drift
        dr = run_monitor(date, hour)
        assert str(dr.state) == "success", task_states(dr)
        d = decision(s, date, hour)
        assert d["actions"] == [], d  # the slow canary is the canary judge's, not ours
        store = open_store(s.store)
        report = json.loads(store.read_text(store.key_of(d["report_uri"])))
        assert report["context"]["rollout_in_progress"]
        assert report["findings"]["slo"]["version"] == v1
        assert report["metrics"]["versions"][v2]["slo"] == "breach"  # seen, not acted on
        after = stages.serving_state(s)
        assert after["labels"] == before["labels"] and after["canary_weight"] == 50
        assert reg.alias_version(CHAMPION) == v1
