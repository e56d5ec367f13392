"""Stages write the audit trail: validate_data records accepted and quarantined batches."""

from __future__ import annotations

import pytest

from pipelines import stages
from pipelines.audit import AuditError, AuditLog
from pipelines.config import Settings
from pipelines.data.results import ValidationBlocked
from pipelines.store import open_store

pytestmark = pytest.mark.integration


def test_validate_data_records_accepted_and_quarantined_batches(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "mlops_training_pipeline")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__1")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "validate_data")
    monkeypatch.delenv("AIRFLOW_CTX_TRY_NUMBER", raising=False)
    stages.generate_data(local_settings, "2026-11-01", rows=2000)
    stages.generate_data(local_settings, "2026-11-02", rows=2000, defect="nulls")
    accepted = stages.validate_data(local_settings, "2026-11-01")
    with pytest.raises(ValidationBlocked) as blocked:
        stages.validate_data(local_settings, "2026-11-02")

    log = AuditLog(open_store(local_settings.store))
    assert log.verify().ok
    first, second = log.entries()
    assert (first["event"], first["subject"]) == ("data.accepted", "transactions/2026-11-01")
    assert first["details"]["status"] == accepted["status"]
    assert first["details"]["report_uri"] == accepted["report_uri"]
    assert first["actor"] == "airflow:mlops_training_pipeline/manual__1/validate_data"
    assert (second["event"], second["subject"]) == ("data.quarantined", "transactions/2026-11-02")
    assert second["details"]["quarantine_uri"] == blocked.value.summary.quarantine_uri
    assert "block:expect_column_values_to_not_be_null:amount" in second["details"]["failures"]


def test_a_stage_whose_audit_write_fails_fails(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages.generate_data(local_settings, "2026-11-01", rows=500)

    def refuse(self: AuditLog, *args: object, **kwargs: object) -> None:
        raise AuditError("Could not append data.accepted: Access Denied")

    monkeypatch.setattr(AuditLog, "append", refuse)
    with pytest.raises(AuditError, match="Access Denied"):
        stages.validate_data(local_settings, "2026-11-01")
