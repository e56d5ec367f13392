"""The optimisation gate: an optimised runtime is kept only when faster at batch 1 and 1024 and
within the accuracy limits of the SavedModel; the report says why, row by row."""

from __future__ import annotations

from dataclasses import replace

from pipelines.optimize.gate import Limits, Measured, decide

BASE = Measured(
    name="savedmodel-fp32",
    runtime="savedmodel",
    variant="fp32",
    p50_ms_b1=0.500,
    p99_ms_b1=0.900,
    rows_per_s_b1024=200_000.0,
    roc_auc=0.9000,
    agreement=1.0,
    max_abs_diff=0.0,
)
FP32 = replace(
    BASE,
    name="onnxruntime-fp32",
    runtime="onnxruntime",
    p50_ms_b1=0.020,
    p99_ms_b1=0.050,
    rows_per_s_b1024=900_000.0,
    max_abs_diff=1e-7,
)
INT8 = replace(
    FP32,
    name="onnxruntime-int8",
    variant="int8",
    p50_ms_b1=0.015,
    rows_per_s_b1024=1_200_000.0,
    roc_auc=0.8995,
    agreement=0.999,
    max_abs_diff=2e-3,
)


def test_a_faster_accurate_fp32_is_chosen_over_the_savedmodel() -> None:
    report = decide(BASE, [FP32])
    assert (report.chosen_runtime, report.chosen_variant) == ("onnxruntime", "fp32")
    (row,) = report.verdicts
    assert row.kept and row.compared_with == "savedmodel-fp32"
    assert row.reasons[0].startswith("KEPT onnxruntime-fp32")


def test_int8_must_beat_fp32_not_only_the_savedmodel() -> None:
    slow_int8 = replace(INT8, p50_ms_b1=0.061)  # still 8x faster than the SavedModel
    report = decide(BASE, [FP32, slow_int8])
    assert report.chosen.name == "onnxruntime-fp32"
    fp32_row, int8_row = report.verdicts
    assert fp32_row.kept and not int8_row.kept
    assert int8_row.compared_with == "onnxruntime-fp32"
    assert int8_row.reasons == [
        "REJECTED onnxruntime-int8: int8 p50 0.061 ms is slower than onnxruntime-fp32's 0.020 ms"
    ]


def test_a_faster_accurate_int8_replaces_fp32() -> None:
    report = decide(BASE, [FP32, INT8])
    assert (report.chosen_runtime, report.chosen_variant) == ("onnxruntime", "int8")
    assert [v.kept for v in report.verdicts] == [True, True]


def test_an_auc_drop_over_the_limit_is_rejected_even_when_faster() -> None:
    degraded = replace(INT8, roc_auc=0.8900)
    report = decide(BASE, [FP32, degraded])
    assert report.chosen.name == "onnxruntime-fp32"
    (reason,) = report.verdicts[1].reasons
    assert "ROC-AUC 0.8900 is 0.0100 below savedmodel-fp32's 0.9000 (limit 0.002)" in reason


def test_low_agreement_is_rejected_even_when_faster() -> None:
    report = decide(BASE, [replace(FP32, agreement=0.98)])
    assert report.chosen.name == "savedmodel-fp32"
    (reason,) = report.verdicts[0].reasons
    assert "agreement 0.9800 with savedmodel-fp32's decisions is under 0.995" in reason


def test_faster_at_batch_1_but_slower_at_1024_is_rejected() -> None:
    report = decide(BASE, [replace(FP32, rows_per_s_b1024=150_000.0)])
    assert report.chosen.name == "savedmodel-fp32" and not report.verdicts[0].kept
    (reason,) = report.verdicts[0].reasons
    assert "150,000 rows/s at batch 1024 is slower than savedmodel-fp32's 200,000" in reason


def test_accuracy_is_judged_against_the_baseline_not_the_chosen_runtime() -> None:
    # Each step loses 0.0015 AUC (under the limit), but int8 is 0.003 below the SavedModel.
    fp32 = replace(FP32, roc_auc=0.8985)
    int8 = replace(INT8, roc_auc=0.8970)
    report = decide(BASE, [fp32, int8], Limits(max_auc_drop=0.002))
    assert [v.kept for v in report.verdicts] == [True, False]


def test_the_table_has_the_baseline_first_and_marks_the_chosen_row() -> None:
    table = decide(BASE, [FP32, replace(INT8, p50_ms_b1=0.061)]).table()
    assert [r["name"] for r in table] == ["savedmodel-fp32", "onnxruntime-fp32", "onnxruntime-int8"]
    assert [r["chosen"] for r in table] == [False, True, False]
    assert [r["kept"] for r in table] == [True, True, False]
    assert {"p50_ms_b1", "p99_ms_b1", "rows_per_s_b1024", "roc_auc", "agreement"} <= set(table[0])


def test_no_candidates_keeps_the_savedmodel() -> None:
    report = decide(BASE, [])
    assert report.to_dict()["chosen_runtime"] == "savedmodel" and report.verdicts == []
