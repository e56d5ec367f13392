"""The command line's rough edges: bad input exits 2 with one clear line; a quiet log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.cli import _own_or_warning, main


def test_negative_rows_are_bad_input_named_by_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data", "generate", "--date", "2026-11-01", "--rows", "-5"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "mlops data generate: error: argument --rows: must be at least 1, got -5"


def test_library_chatter_is_kept_out_unless_verbose() -> None:
    def rec(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    assert not _own_or_warning(rec("great_expectations.data_context.types.base", logging.INFO))
    assert _own_or_warning(rec("great_expectations", logging.WARNING))
    assert _own_or_warning(rec("pipelines.data.validate", logging.INFO))
    assert not _own_or_warning(rec("pipelinesx", logging.INFO))


def test_an_unknown_run_id_is_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.config import settings

    for name in ("TF_CPP_MIN_LOG_LEVEL", "MLFLOW_LOGGING_LEVEL"):  # main() sets them
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    monkeypatch.delenv("MLOPS_PROFILE", raising=False)
    settings.cache_clear()
    try:
        assert main(["evaluate", "--run-id", "no-such-run"]) == 2
    finally:
        settings.cache_clear()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mlops evaluate: MLflow run 'no-such-run' does not exist."
    )


def test_generating_a_day_that_has_data_is_refused_unless_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second `data generate` for a day would replace landed data and delete its validation
    report: refused, naming the partition; --overwrite replaces both, and says so."""
    from pipelines.config import settings

    for name in ("TF_CPP_MIN_LOG_LEVEL", "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    monkeypatch.delenv("MLOPS_PROFILE", raising=False)
    day = tmp_path / "mlops" / "lake" / "landing" / "transactions" / "dt=2026-11-01"
    settings.cache_clear()
    try:
        args = ["data", "generate", "--date", "2026-11-01", "--rows", "200"]
        assert main(args) == 0
        report = day / "_validation" / "report.json"
        report.parent.mkdir()
        report.write_text("{}")
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "dt=2026-11-01 already holds 2 file(s)" in err and "--overwrite" in err
        assert report.exists()
        assert main([*args, "--overwrite"]) == 0
        assert not report.exists() and (day / "part-00000.parquet").exists()
    finally:
        settings.cache_clear()
