"""Pure planning of a scoring run: chunks of whole parquet row groups, the jobs that score them,
and the manifest that publishes their outputs. No I/O here (fast unit tests)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

MANIFEST = "manifest.json"
OUTPUT_COLUMNS = ("key", "score", "decision", "model_version")


class PlanError(ValueError):
    """The input cannot be scored as asked (no rows, bad chunk size)."""


@dataclass(frozen=True)
class InputFile:
    """One landing file as its parquet footer describes it, with its content hash."""

    key: str
    sha256: str
    row_groups: tuple[int, ...]  # rows per row group


@dataclass(frozen=True)
class Chunk:
    """Row groups ``[first_group, stop_group)`` of one file: the unit a task (or pod) scores
    and a retry repeats alone. Never rows: a chunk is what a reader fetches in ranged reads."""

    index: int
    source: str
    first_group: int
    stop_group: int
    rows: int

    @property
    def part(self) -> str:
        return f"part-{self.index:05d}.parquet"


def plan_chunks(files: Sequence[InputFile], target_rows: int) -> list[Chunk]:
    """Greedy, in file order: row groups are added to a chunk until it holds ``target_rows``
    or its file ends. The same files and target always give the same chunks (a retry and a
    rerun write the same parts)."""
    if target_rows < 1:
        raise PlanError(f"batch.chunk_rows must be at least 1, got {target_rows}.")
    chunks: list[Chunk] = []
    for f in files:
        start, rows = 0, 0
        for i, n in enumerate(f.row_groups):
            rows += n
            if rows >= target_rows:
                chunks.append(Chunk(len(chunks), f.key, start, i + 1, rows))
                start, rows = i + 1, 0
        if rows:
            chunks.append(Chunk(len(chunks), f.key, start, len(f.row_groups), rows))
    if not chunks:
        raise PlanError("The partition has no rows to score.")
    return chunks


@dataclass(frozen=True)
class ScoringJob:
    """Everything one chunk's task needs, JSON-able (an XCom, a pod's argument); no secret."""

    dataset: str
    date: str
    model: str
    version: str
    runtime: str  # "savedmodel" | "onnx"
    variant: str  # "fp32" | "int8"
    threshold: float
    key_column: str
    features: tuple[str, ...]
    output_prefix: str
    chunk: Chunk

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringJob:
        fields = dict(data)
        fields["chunk"] = Chunk(**fields["chunk"])
        fields["features"] = tuple(fields["features"])
        return cls(**fields)


def manifest(
    jobs: Sequence[ScoringJob],
    inputs: Sequence[InputFile],
    parts: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The published description of one day's scores: what was scored (input files and their
    sha256), by what (version, runtime, variant, threshold), and every part with its rows and
    sha256. No clock in it: the same inputs and model give the same manifest bytes."""
    if not jobs:
        raise PlanError("No chunk was scored.")
    by_index = {int(p["index"]): p for p in parts}
    missing = [j.chunk.index for j in jobs if j.chunk.index not in by_index]
    if missing:
        raise PlanError(f"Chunks {missing} have no scored part; their tasks must succeed first.")
    wrong = [j.chunk.index for j in jobs if int(by_index[j.chunk.index]["rows"]) != j.chunk.rows]
    if wrong:
        raise PlanError(f"Chunks {wrong} scored a different number of rows than planned.")
    head = jobs[0]
    return {
        "dataset": head.dataset,
        "date": head.date,
        "model": head.model,
        "version": head.version,
        "runtime": head.runtime,
        "variant": head.variant,
        "threshold": head.threshold,
        "key_column": head.key_column,
        "columns": list(OUTPUT_COLUMNS),
        "inputs": [{"key": f.key, "sha256": f.sha256} for f in inputs],
        "rows": sum(j.chunk.rows for j in jobs),
        "parts": [
            {
                "path": j.chunk.part,
                "source": j.chunk.source,
                "row_groups": [j.chunk.first_group, j.chunk.stop_group],
                "rows": j.chunk.rows,
                "sha256": by_index[j.chunk.index]["sha256"],
            }
            for j in sorted(jobs, key=lambda j: j.chunk.index)
        ],
    }


def manifest_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
