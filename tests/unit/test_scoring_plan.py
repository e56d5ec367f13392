"""Batch scoring's pure parts: chunks of whole row groups, jobs, the manifest, part bytes."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.batch.plan import (
    Chunk,
    InputFile,
    PlanError,
    ScoringJob,
    manifest,
    manifest_bytes,
    plan_chunks,
)
from pipelines.batch.score import part_bytes


def _job(chunk: Chunk) -> ScoringJob:
    return ScoringJob(
        dataset="transactions",
        date="2026-11-01",
        model="fraud_detector",
        version="3",
        runtime="savedmodel",
        variant="fp32",
        threshold=0.5,
        key_column="transaction_id",
        features=("amount", "merchant_category"),
        output_prefix="predictions/transactions/fraud_detector/3/dt=2026-11-01",
        chunk=chunk,
    )


FILES = [
    InputFile("landing/t/dt=2026-11-01/part-00000.parquet", "a" * 64, (100, 100, 100, 50)),
    InputFile("landing/t/dt=2026-11-01/part-00001.parquet", "b" * 64, (30,)),
]


def test_chunks_pack_whole_row_groups_and_never_span_files() -> None:
    chunks = plan_chunks(FILES, target_rows=200)
    assert [(c.source[-13:], c.first_group, c.stop_group, c.rows) for c in chunks] == [
        ("00000.parquet", 0, 2, 200),
        ("00000.parquet", 2, 4, 150),  # the file's rest, under the target
        ("00001.parquet", 0, 1, 30),
    ]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.part for c in chunks] == [f"part-0000{i}.parquet" for i in range(3)]
    assert sum(c.rows for c in chunks) == 380


def test_a_large_target_gives_one_chunk_per_file_and_a_small_one_a_chunk_per_group() -> None:
    assert [c.rows for c in plan_chunks(FILES, 10**9)] == [350, 30]
    assert [c.rows for c in plan_chunks(FILES, 1)] == [100, 100, 100, 50, 30]
    assert plan_chunks(FILES, 200) == plan_chunks(FILES, 200)  # a rerun cuts the same chunks


def test_no_rows_or_a_bad_target_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="no rows"):
        plan_chunks([InputFile("k", "c" * 64, ())], 100)
    with pytest.raises(PlanError, match="chunk_rows must be at least 1"):
        plan_chunks(FILES, 0)


def test_a_job_round_trips_through_json() -> None:
    job = _job(plan_chunks(FILES, 200)[1])
    assert ScoringJob.from_dict(json.loads(job.to_json())) == job


def test_the_manifest_lists_every_part_and_has_no_clock() -> None:
    jobs = [_job(c) for c in plan_chunks(FILES, 200)]
    parts = [
        {"index": j.chunk.index, "rows": j.chunk.rows, "sha256": f"{j.chunk.index}" * 64}
        for j in jobs
    ]
    m = manifest(jobs, FILES, parts[::-1])  # the order parts finished in does not matter
    assert m["rows"] == 380 and [p["path"] for p in m["parts"]] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert m["parts"][1]["row_groups"] == [2, 4] and m["inputs"][1]["sha256"] == "b" * 64
    assert (m["version"], m["runtime"], m["threshold"]) == ("3", "savedmodel", 0.5)
    assert manifest_bytes(m) == manifest_bytes(manifest(jobs, FILES, parts))
    assert set(m) == {  # what was scored, by what, and the parts: no timestamp
        "dataset",
        "date",
        "model",
        "version",
        "runtime",
        "variant",
        "threshold",
        "key_column",
        "columns",
        "inputs",
        "rows",
        "parts",
    }


def test_a_manifest_needs_every_planned_part_with_its_planned_rows() -> None:
    jobs = [_job(c) for c in plan_chunks(FILES, 200)]
    parts = [{"index": j.chunk.index, "rows": j.chunk.rows, "sha256": "0" * 64} for j in jobs]
    with pytest.raises(PlanError, match=r"Chunks \[1\] have no scored part"):
        manifest(jobs, FILES, [parts[0], parts[2]])
    parts[2]["rows"] = 29
    with pytest.raises(PlanError, match=r"Chunks \[2\] scored a different number of rows"):
        manifest(jobs, FILES, parts)


def test_part_bytes_are_the_same_for_the_same_rows_and_say_the_decision() -> None:
    job = _job(Chunk(0, "k", 0, 1, 3))
    keys = pa.chunked_array([["t1", "t2"], ["t3"]])
    scores = np.array([0.1, 0.5, 0.9], dtype=np.float32)
    data = part_bytes(keys, scores, job)
    assert data == part_bytes(pa.array(["t1", "t2", "t3"]), scores.astype(np.float64), job)
    table = pq.read_table(io.BytesIO(data))
    assert table.column_names == ["key", "score", "decision", "model_version"]
    assert table.column("decision").to_pylist() == [False, True, True]  # score >= threshold
    assert table.column("model_version").to_pylist() == ["3", "3", "3"]
    assert table.schema.metadata is None or b"pandas" not in table.schema.metadata
