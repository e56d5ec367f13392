"""``mlops``: every pipeline stage from a terminal, a pod or a test, with the DAG's configuration.

Exit codes: 0 success; 1 a gate said no (batch blocked, candidate rejected, canary rolled
back) or `audit verify` found the chain broken; 2 bad usage, input or configuration; 3 the
stage failed at run time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.config import Settings

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


def _settings() -> Settings:
    from pipelines.config import settings

    return settings()


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _own_or_warning(record: logging.LogRecord) -> bool:
    """Without --verbose: the project's own records, and everyone's warnings and errors."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in ("pipelines", "mlops")


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_data_generate(a: argparse.Namespace) -> int:
    from pipelines import stages

    _print(
        stages.generate_data(
            _settings(), a.date, a.dataset, a.rows, a.drift, a.defect, a.seed, a.overwrite
        )
    )
    return EXIT_OK


def cmd_data_validate(a: argparse.Namespace) -> int:
    from pipelines import stages
    from pipelines.data.results import ValidationBlocked

    try:
        out = stages.validate_data(_settings(), a.date, a.dataset)
    except ValidationBlocked as exc:
        print(exc.summary.message())
        return EXIT_GATE
    _print(out)
    return EXIT_OK


def cmd_data_shard(a: argparse.Namespace) -> int:
    from pipelines import stages

    out = stages.shard_data(_settings(), a.date, a.dataset)
    print(out["manifest_uri"])
    return EXIT_OK


def cmd_train(a: argparse.Namespace) -> int:
    from pipelines import stages
    from pipelines.params import apply_params

    s = apply_params(
        _settings(),
        {
            "nodes": a.nodes,
            "procs_per_node": a.procs_per_node,
            "epochs": a.epochs,
            "params_from": a.params_from,
        },
    )
    out = stages.train(
        s, a.manifest, run_key=a.run_key, sink=lambda line: print(line, file=sys.stderr)
    )
    print(out["run_id"])
    return EXIT_OK


def cmd_tune(a: argparse.Namespace) -> int:
    from pipelines import stages
    from pipelines.params import apply_params
    from pipelines.tune.storage import StorageUnavailable

    s = apply_params(_settings(), {"trials": a.trials, "workers": a.workers, "study": a.study})
    try:
        out = stages.tune(
            s,
            a.manifest,
            s.tuning.trials,
            s.tuning.workers,
            a.study,
            sink=lambda line: print(line, file=sys.stderr),
        )
    except StorageUnavailable as exc:
        print(f"mlops tune: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print(out)
    return EXIT_OK


def cmd_score(a: argparse.Namespace) -> int:
    from pipelines import stages
    from pipelines.params import apply_params

    s = apply_params(_settings(), {"runtime": a.runtime, "chunk_rows": a.chunk_rows})
    out = stages.score(s, a.date, version=a.version, workers=a.workers, dataset=a.dataset)
    _print(out)
    return EXIT_OK


def cmd_traffic(a: argparse.Namespace) -> int:
    from pipelines.monitoring.traffic import TrafficError, send

    try:
        out = send(
            _settings(), a.date, a.rate, a.requests, a.drift, a.concurrency, dataset=a.dataset
        )
    except TrafficError as exc:
        print(f"mlops traffic: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _print(out)
    return EXIT_OK


def cmd_evaluate(a: argparse.Namespace) -> int:
    from pipelines import stages

    out = stages.evaluate(_settings(), a.run_id, a.force, a.reason)
    print("\n".join(out["reasons"]))
    print("BLESSED" if out["blessed"] else "REJECTED")
    return EXIT_OK if out["blessed"] else EXIT_GATE


def cmd_register(a: argparse.Namespace) -> int:
    from pipelines import stages

    out = stages.register(_settings(), a.run_id)
    if out["model_version"] is None:
        print(f"Run {a.run_id} is not blessed; it was not registered.", file=sys.stderr)
        return EXIT_GATE
    print(out["model_version"])
    return EXIT_OK


def cmd_rollout(a: argparse.Namespace) -> int:
    from pipelines import stages

    s = _settings()
    if not a.skip_export:
        _print(stages.export_and_infra_validate(s, a.version))
    _print(stages.stage_canary(s, a.version))
    _print(stages.shadow_candidate(s, a.version))
    verdict = stages.monitor_canary(s, a.version)
    _print(verdict)
    if verdict["decision"] == "promote":
        _print(stages.promote(s, a.version))
        return EXIT_OK
    _print(stages.rollback(s, a.version, verdict["reason"]))
    return EXIT_GATE


def _stop_local_serving(s: Settings) -> int:
    from pipelines import stages

    stopped = stages.stop_local_serving(s)
    print(f"local serving stopped: {', '.join(stopped) or 'nothing was running'}")
    return EXIT_OK


def cmd_serve(a: argparse.Namespace) -> int:
    from pipelines import stages

    s = _settings()
    if a.stop:
        return _stop_local_serving(s)
    if a.status:
        _print(stages.serving_state(s))
        return EXIT_OK
    from pathlib import Path

    from pipelines.serving.errors import ServingError
    from pipelines.serving.server import serve

    config = a.model_config or str(Path(s.serving.base_dir) / "models.config")
    batching = None
    if s.serving.enable_batching if a.enable_batching is None else a.enable_batching:
        from pipelines.serving.batching import BatchingConfigError, load_batching_parameters

        try:
            _, batching = load_batching_parameters(
                a.batching_parameters_file or s.serving.batching_parameters_file
            )
        except BatchingConfigError as exc:  # TF Serving does not start on a bad file either
            print(f"mlops serve: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        serve(
            config,
            a.host or s.serving.host,
            s.serving.rest_port if a.rest_port is None else a.rest_port,
            s.serving.grpc_port
            if a.grpc_port is None
            else (a.grpc_port if a.grpc_port >= 0 else None),
            a.poll_seconds or s.serving.poll_seconds,
            a.port_file,
            a.allow_unavailable_labels,
            batching,
        )
    except ServingError as exc:  # the first config was refused: TF Serving does not start
        print(f"mlops serve: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_dataplane(a: argparse.Namespace) -> int:
    from pipelines import stages

    s = _settings()
    if a.action == "render":
        from pipelines.serving.dataplane.envoy import bootstrap_yaml, kubernetes_bootstrap_yaml
        from pipelines.serving.dataplane.local import LocalPlane

        if s.serving.mode == "remote":
            print(kubernetes_bootstrap_yaml(s), end="")
        else:
            print(bootstrap_yaml(LocalPlane(s.serving, s.dataplane, s.mlflow.model_name).plane()))
        return EXIT_OK
    if a.action == "stop":
        return _stop_local_serving(s)
    control = stages.serving_control(s)
    if a.action == "start":
        control.ensure_running()
    _print(stages.serving_state(s))
    return EXIT_OK


def cmd_audit_verify(a: argparse.Namespace) -> int:
    from pipelines.audit import AuditLog
    from pipelines.store import open_store

    result = AuditLog(open_store(_settings().store)).verify()
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_GATE


def cmd_audit_show(a: argparse.Namespace) -> int:
    from pipelines.audit import AuditLog
    from pipelines.store import open_store

    if a.last is not None and a.last < 1:
        raise ValueError(f"--last must be at least 1, got {a.last}.")
    for e in AuditLog(open_store(_settings().store)).entries(a.last):
        if a.json:
            print(json.dumps(e, sort_keys=True))
        else:
            details = json.dumps(e.get("details"), sort_keys=True)
            print(
                f"{e.get('seq')} {e.get('time')} {e.get('event')} {e.get('subject')} "
                f"by {e.get('actor')} {details}"
            )
    return EXIT_OK


def cmd_demo(a: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(
        reset=a.reset,
        start=a.start,
        keep_serving=a.keep_serving,
        skewed_export=a.skewed_export,
        skip_shadow=a.skip_shadow,
    )


def cmd_airflow(a: argparse.Namespace) -> int:
    from pipelines.airflow_local import standalone

    return standalone(_settings())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the main job end to end on embedded defaults")
    d.add_argument("--reset", action="store_true", help="delete MLOPS_HOME first")
    d.add_argument("--start", default="2026-11-01", help="first partition date")
    d.add_argument("--keep-serving", action="store_true", help="leave the model server up")
    d.add_argument(
        "--skewed-export",
        action="store_true",
        help="a drill: day 2's challenger is published with a broken preprocessing step "
        "(serving.inject_export_skew); the shadow stage must stop it",
    )
    d.add_argument(
        "--skip-shadow",
        action="store_true",
        help="day 2 without the shadow stage (its skip_shadow param): the canary judges alone",
    )
    d.set_defaults(fn=cmd_demo)

    af = sub.add_parser(
        "airflow",
        help="airflow standalone with this project's DAGs on a PostgreSQL it starts and stops "
        "(make airflow)",
    )
    af.set_defaults(fn=cmd_airflow)

    data = sub.add_parser("data", help="generate, validate and shard landing data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    g = dsub.add_parser("generate", help="write a synthetic landing partition")
    g.add_argument("--dataset")
    g.add_argument("--date", required=True)
    g.add_argument("--rows", type=_positive_int, help="rows to write (default data.rows_per_day)")
    g.add_argument("--drift", type=float, default=0.0)
    g.add_argument("--defect", help="inject one defect (see pipelines.data.generate.DEFECTS)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a day that already has data (its validation report goes with it)",
    )
    g.set_defaults(fn=cmd_data_generate)
    for name, fn, text in (
        ("validate", cmd_data_validate, "exit 0 accepted, 1 blocked"),
        ("shard", cmd_data_shard, "prints the manifest URI"),
    ):
        c = dsub.add_parser(name, help=text)
        c.add_argument("--dataset")
        c.add_argument("--date", required=True)
        c.set_defaults(fn=fn)

    sc = sub.add_parser(
        "score",
        help="score a day's landing partition with the champion (or --version) and publish "
        "predictions/<dataset>/<model>/<version>/dt=D under a manifest",
    )
    sc.add_argument("--date", required=True)
    sc.add_argument("--version", help="pin a registered version (default: the champion)")
    sc.add_argument("--workers", type=_positive_int, help="local worker processes")
    sc.add_argument("--dataset")
    sc.add_argument(
        "--runtime",
        choices=["auto", "savedmodel", "onnx"],
        help="auto: the version's optimisation-gate choice (default batch.runtime)",
    )
    sc.add_argument("--chunk-rows", type=_positive_int, help="target rows per chunk")
    sc.set_defaults(fn=cmd_score)

    tr = sub.add_parser(
        "traffic",
        help="replay a day's rows through the data plane as live requests (demo, monitoring)",
    )
    tr.add_argument("--date", required=True, help="the day whose rows are sent")
    tr.add_argument("--rate", type=float, default=200.0, help="requests per second")
    tr.add_argument("--requests", type=_positive_int, help="how many (default: every row once)")
    tr.add_argument(
        "--drift", type=float, default=0.0, help="send the generator's rows drawn with this drift"
    )
    tr.add_argument("--concurrency", type=_positive_int, default=4, help="concurrent clients")
    tr.add_argument("--dataset")
    tr.set_defaults(fn=cmd_traffic)

    t = sub.add_parser("train", help="train on a manifest; prints the MLflow run id")
    t.add_argument("--manifest", required=True)
    t.add_argument("--nodes", type=int)
    t.add_argument("--procs-per-node", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--run-key", help="idempotency key: reuse (resume) the run with this key")
    t.add_argument(
        "--params-from",
        choices=["config", "tuning"],
        help="tuning: the best trial of the data set's latest study (or tuning.study)",
    )
    t.set_defaults(fn=cmd_train)

    tu = sub.add_parser(
        "tune",
        help="an Optuna study on PostgreSQL, W parallel workers; prints its best params",
    )
    tu.add_argument("--manifest", required=True, help="the published data set's manifest URI")
    tu.add_argument("--trials", type=_positive_int, help="trial budget (default tuning.trials)")
    tu.add_argument("--workers", type=_positive_int, help="workers (default tuning.workers)")
    tu.add_argument("--study", help="study name; an existing study is continued")
    tu.set_defaults(fn=cmd_tune)

    e = sub.add_parser("evaluate", help="exit 0 blessed, 1 rejected; reasons printed")
    e.add_argument("--run-id", required=True)
    e.add_argument("--force", choices=["bless", "reject"])
    e.add_argument("--reason", help="required with --force")
    e.set_defaults(fn=cmd_evaluate)

    r = sub.add_parser("register", help="prints the model version")
    r.add_argument("--run-id", required=True)
    r.set_defaults(fn=cmd_register)

    ro = sub.add_parser("rollout", help="export, canary, then promote (exit 0) or roll back (1)")
    ro.add_argument("--version", required=True)
    ro.add_argument("--skip-export", action="store_true", help="the version is already exported")
    ro.set_defaults(fn=cmd_rollout)

    dp = sub.add_parser(
        "dataplane", help="Envoy and the model-server replicas behind it (local profile)"
    )
    dp.add_argument(
        "action",
        choices=["start", "stop", "status", "render"],
        help="start (idempotent), stop every local serving process, print the topology and "
        "split, or print Envoy's bootstrap for this profile",
    )
    dp.set_defaults(fn=cmd_dataplane)

    au = sub.add_parser("audit", help="the hash-chained audit trail in the object store")
    asub = au.add_subparsers(dest="audit_command", required=True)
    av = asub.add_parser("verify", help="check the chain; exit 0 intact, 1 broken")
    av.set_defaults(fn=cmd_audit_verify)
    ash = asub.add_parser("show", help="print entries, oldest first (not verified)")
    ash.add_argument("--last", type=int, help="only the last N entries")
    ash.add_argument("--json", action="store_true", help="one JSON object per line")
    ash.set_defaults(fn=cmd_audit_show)

    def _flag_bool(text: str) -> bool:
        """A bool flag's value as TF Serving's flags take it (--enable_batching=false)."""
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")

    s = sub.add_parser("serve", help="TF-Serving-compatible REST server (foreground)")
    s.add_argument("--host")
    s.add_argument("--rest-port", type=int, help="REST port (default 8501; 0 = a free port)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 8500; 0 = free; -1 = off)")
    s.add_argument("--model-config", help="model_config_list file (default: MLOPS_HOME's)")
    s.add_argument("--poll-seconds", type=float)
    s.add_argument("--port-file", help="write the bound port here (used with --rest-port 0)")
    s.add_argument(
        "--allow_version_labels_for_unavailable_models",
        "--allow-version-labels-for-unavailable-models",
        dest="allow_unavailable_labels",
        action="store_true",
        help="as TF Serving's flag: labels may point at versions still loading (needed for a "
        "first config with labels)",
    )
    s.add_argument(
        "--enable_batching",
        "--enable-batching",
        dest="enable_batching",
        nargs="?",
        const=True,
        type=_flag_bool,
        help="as TF Serving's flag: batch predict requests (default: serving.enable_batching; "
        "--enable_batching=false turns it off)",
    )
    s.add_argument(
        "--batching_parameters_file",
        "--batching-parameters-file",
        dest="batching_parameters_file",
        help="as TF Serving's flag: BatchingParameters text proto (default: "
        "serving.batching_parameters_file, else infra/tf-serving/batching.config)",
    )
    s.add_argument("--stop", action="store_true", help="stop every local serving process")
    s.add_argument("--status", action="store_true", help="print labels, split and topology")
    s.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The command prints its own summary and errors; libraries (Great Expectations, MLflow,
    # TensorFlow's C++ runtime) stay at WARNING unless --verbose.
    owned = not logging.getLogger().handlers  # a host (pytest, Airflow) keeps its own
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pipelines").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if owned and not args.verbose:
        # Some libraries set their own loggers to INFO when imported (Great Expectations does):
        # the handler, not the level, keeps their chatter out.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_own_or_warning)
    if not args.verbose:
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from pipelines.config import ConfigError
    from pipelines.data.spec import SpecError
    from pipelines.registry import RunNotFound

    try:
        return int(args.fn(args))
    except (ConfigError, SpecError, RunNotFound, ValueError, FileNotFoundError) as exc:
        print(f"mlops {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logging.getLogger("mlops").debug("failure", exc_info=True)
        print(f"mlops {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
