"""The worker -> launcher result line: what rank 0 writes, the launcher reads back."""

from __future__ import annotations

import math

import pytest

from pipelines.train.result import MARK, MalformedResult, format_result, parse_result


def test_a_written_result_parses_back_to_the_same_metrics() -> None:
    metrics = {"val_auc": 0.91, "world_size": 2.0, "steps": 120.0, "restarts": 0}
    line = format_result(metrics)
    assert line.startswith(MARK) and "\n" not in line
    assert parse_result(line) == {k: float(v) for k, v in metrics.items()}
    # torchrun may prefix a worker's lines; the marker is found anywhere.
    assert parse_result(f"[default0]:{line}") == parse_result(line)


def test_a_nan_metric_survives_the_round_trip() -> None:
    out = parse_result(format_result({"train_loss": float("nan")}))
    assert out is not None and math.isnan(out["train_loss"])


@pytest.mark.parametrize("line", ["", "epoch 3 loss 0.12", "MLOPS_TRAIN_RESULT"])
def test_other_lines_are_no_result(line: str) -> None:
    assert parse_result(line) is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", "is a list, not an object"),
        ('{"val_auc": "high"}', r"\['val_auc'\] are not numbers"),
        ('{"ok": true}', r"\['ok'\] are not numbers"),
    ],
)
def test_a_malformed_result_line_is_an_error_that_says_why(payload: str, message: str) -> None:
    with pytest.raises(MalformedResult, match=message):
        parse_result(MARK + payload)
