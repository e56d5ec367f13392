"""Request batching (pipelines/serving/batching.py) on a fake model: TF Serving's queue, merge,
pad and split semantics, its batching file format and validation, and no thread left behind."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipelines.serving.batching import (
    QUEUE_FULL,
    REPO_BATCHING_FILE,
    Batcher,
    BatchingConfigError,
    BatchingParameters,
    load_batching_parameters,
    parse_batching_parameters,
)
from pipelines.serving.errors import ServingError


class FakeModel:
    """y = 10 x; records each batch's inputs (so merging and padding are visible). ``gate``,
    when set, holds every batch until released."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[dict[str, np.ndarray]] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append(inputs)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return {"y": inputs["x"] * 10}


@pytest.fixture
def batcher_factory() -> Iterator[Callable[..., Batcher]]:
    made: list[Batcher] = []

    def make(run: Any, **params: Any) -> Batcher:
        b = Batcher(run, BatchingParameters(**params), "test")
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop(timeout=10)
        assert not any(t.is_alive() for t in b.threads)


def rows(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.asarray(values, dtype=np.float32)}


def concurrently(batcher: Batcher, requests: list[dict[str, np.ndarray]]) -> list[Any]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(batcher.submit, requests))


# -- the scheduler ---------------------------------------------------------------------------
def test_concurrent_requests_coalesce_into_one_batch_and_get_their_own_rows(
    batcher_factory: Callable[..., Batcher],
) -> None:
    model = FakeModel()
    # A long timeout: the batch runs because it is full, not because the timeout passed.
    b = batcher_factory(model, max_batch_size=6, batch_timeout_micros=5_000_000)
    requests = [rows(1), rows(2, 3), rows(4, 5, 6)]
    started = time.monotonic()
    answers = concurrently(b, requests)
    assert time.monotonic() - started < 4
    assert [len(batch["x"]) for batch in model.batches] == [6]
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], request["x"] * 10)
    assert b.stats == {"batches": 1, "tasks": 3, "rows": 6, "padding_rows": 0}


def test_a_batch_is_padded_to_the_next_allowed_size_with_the_first_row(
    batcher_factory: Callable[..., Batcher],
) -> None:
    model = FakeModel()
    b = batcher_factory(
        model, max_batch_size=8, allowed_batch_sizes=(2, 4, 8), batch_timeout_micros=0
    )
    out = b.submit(rows(7, 8, 9))
    np.testing.assert_array_equal(model.batches[0]["x"], [7, 8, 9, 7])  # padded to 4
    np.testing.assert_array_equal(out["y"], [70, 80, 90])  # the padding row is sliced off
    b.submit(rows(1, 2, 3, 4))
    assert len(model.batches[1]["x"]) == 4  # already an allowed size: no padding
    assert b.stats == {"batches": 2, "tasks": 2, "rows": 7, "padding_rows": 1}


def test_timeout_zero_runs_what_is_queued_now(batcher_factory: Callable[..., Batcher]) -> None:
    model = FakeModel()
    b = batcher_factory(model, max_batch_size=100, batch_timeout_micros=0)
    started = time.monotonic()
    b.submit(rows(1))
    assert time.monotonic() - started < 2  # a batch waiting to fill would never run
    assert [len(batch["x"]) for batch in model.batches] == [1]


def test_a_timeout_holds_a_partial_batch_for_more_requests(
    batcher_factory: Callable[..., Batcher],
) -> None:
    model = FakeModel()
    b = batcher_factory(model, max_batch_size=100, batch_timeout_micros=400_000)
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(b.submit, rows(1))
        time.sleep(0.1)  # well inside the 0.4 s window
        second = pool.submit(b.submit, rows(2))
        answers = [first.result(10), second.result(10)]
    assert time.monotonic() - started >= 0.35  # the first request waited for the window
    assert [len(batch["x"]) for batch in model.batches] == [2]
    assert [a["y"].tolist() for a in answers] == [[10], [20]]


def test_an_idle_thread_runs_a_ready_batch_while_another_is_busy(
    batcher_factory: Callable[..., Batcher],
) -> None:
    gate = threading.Event()

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if inputs["x"][0] == 1:  # the first batch holds its thread until released
            assert gate.wait(10)
        return {"y": inputs["x"] * 10}

    # A timeout far beyond the test: only the second request closes the first batch.
    b = batcher_factory(
        model, max_batch_size=2, batch_timeout_micros=30_000_000, num_batch_threads=2
    )
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(b.submit, rows(1))  # waits in the open batch
        time.sleep(0.05)
        second = pool.submit(b.submit, rows(2, 3))  # does not fit: closes it, a full batch
        # Whichever thread takes the first batch, the other one runs the second.
        assert second.result(5)["y"].tolist() == [20, 30]
        assert not first.done()
        gate.set()
        assert first.result(10)["y"].tolist() == [10]


def test_a_full_queue_refuses_at_once_with_unavailable(
    batcher_factory: Callable[..., Batcher],
) -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    b = batcher_factory(model, max_batch_size=2, max_enqueued_batches=1, num_batch_threads=1)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(b.submit, rows(1, 2))
        assert model.started.wait(5)  # the only thread is busy with it
        queued = pool.submit(b.submit, rows(3, 4))  # fills the one batch the queue may hold
        deadline = time.monotonic() + 5
        while b.queued_batches() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(ServingError) as info:
            b.submit(rows(5))
        assert time.monotonic() - started < 2  # at once: not after the 10 s the batch is held
        assert info.value.code == "UNAVAILABLE" and info.value.http_status == 503
        assert info.value.message == QUEUE_FULL
        gate.set()
        assert running.result(10)["y"].tolist() == [10, 20]
        assert queued.result(10)["y"].tolist() == [30, 40]


def test_a_request_larger_than_max_batch_size_is_refused(
    batcher_factory: Callable[..., Batcher],
) -> None:
    # TF Serving's default (no enable_large_batch_splitting): refused, not split.
    b = batcher_factory(FakeModel(), max_batch_size=2)
    with pytest.raises(ServingError) as info:
        b.submit(rows(1, 2, 3))
    assert info.value.code == "INVALID_ARGUMENT"
    assert "Task size 3 is larger than maximum batch size 2" in info.value.message


def test_inputs_must_share_a_0th_dimension(batcher_factory: Callable[..., Batcher]) -> None:
    b = batcher_factory(FakeModel())
    with pytest.raises(ServingError, match="equal 0th-dimension size"):
        b.submit({"x": np.zeros(2), "z": np.zeros(3)})
    with pytest.raises(ServingError, match="at least one dimension"):
        b.submit({"x": np.float32(1.0)})  # type: ignore[dict-item]


def test_a_failing_batch_fails_each_of_its_requests(
    batcher_factory: Callable[..., Batcher],
) -> None:
    def broken(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.05)
        raise ServingError("INVALID_ARGUMENT", "bad input")

    b = batcher_factory(broken, max_batch_size=4, batch_timeout_micros=200_000)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(b.submit, rows(i)) for i in (1, 2)]
        for f in futures:
            with pytest.raises(ServingError, match="bad input"):
                f.result(10)


def test_requests_of_different_shapes_run_as_separate_groups(
    batcher_factory: Callable[..., Batcher],
) -> None:
    model = FakeModel()
    b = batcher_factory(model, max_batch_size=8, batch_timeout_micros=300_000)
    narrow = {"x": np.ones((1, 2), np.float32)}
    wide = {"x": np.ones((2, 3), np.float32)}
    answers = concurrently(b, [narrow, wide])
    assert sorted(batch["x"].shape for batch in model.batches) == [(1, 2), (2, 3)]
    assert answers[0]["y"].shape == (1, 2) and answers[1]["y"].shape == (2, 3)


def test_outputs_without_the_batch_dimension_are_an_error(
    batcher_factory: Callable[..., Batcher],
) -> None:
    b = batcher_factory(lambda inputs: {"total": np.float32(inputs["x"].sum())})
    with pytest.raises(ServingError) as info:
        b.submit(rows(1, 2))
    assert info.value.code == "FAILED_PRECONDITION"


def test_stop_drains_queued_requests_then_ends_the_threads() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    b = Batcher(model, BatchingParameters(max_batch_size=1, num_batch_threads=2), "drain")
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(b.submit, rows(i)) for i in (1, 2, 3)]
        assert model.started.wait(5)
        stopper = threading.Thread(target=b.stop)
        stopper.start()
        gate.set()
        stopper.join(10)
        assert sorted(f.result(10)["y"].tolist()[0] for f in futures) == [10, 20, 30]
    assert not any(t.is_alive() for t in b.threads)
    with pytest.raises(ServingError) as info:
        b.submit(rows(4))
    assert info.value.code == "UNAVAILABLE"


def test_the_model_manager_stops_its_batchers() -> None:
    """A predict through ModelManager's batcher path, then stop(): no batch thread left."""
    from pipelines.serving.server import ModelManager, Servable

    manager = ModelManager(batching=BatchingParameters(num_batch_threads=3))
    fn = SimpleNamespace(structured_input_signature=((), {}))
    servable = Servable(1, state="AVAILABLE", signature={"serving_default": fn})
    manager.models["m"] = SimpleNamespace(servables={1: servable})  # type: ignore[assignment]
    batcher = manager._batcher("m", servable, "serving_default")
    assert manager._batcher("m", servable, "serving_default") is batcher  # one per signature
    assert all(t.is_alive() for t in batcher.threads) and len(batcher.threads) == 3
    manager.stop()
    assert not any(t.is_alive() for t in batcher.threads)
    assert servable.batchers == {}


# -- the batching parameters file ------------------------------------------------------------
def test_the_repository_file_parses() -> None:
    path, p = load_batching_parameters(None)
    assert path == REPO_BATCHING_FILE
    assert (p.max_batch_size, p.batch_timeout_micros) == (128, 0)
    assert (p.max_enqueued_batches, p.num_batch_threads) == (1_000_000, 2)


def test_omitted_fields_take_tf_servings_defaults() -> None:
    import os

    p = parse_batching_parameters("")
    assert (p.max_batch_size, p.batch_timeout_micros, p.max_enqueued_batches) == (1000, 0, 10)
    assert p.num_batch_threads == len(os.sched_getaffinity(0))
    assert p.allowed_batch_sizes == () and p.pad_variable_length_inputs is False


def test_every_field_and_text_format_variant_parses() -> None:
    p = parse_batching_parameters(
        """
        # comments and separators as protobuf's text format allows them
        max_batch_size { value: 8 }
        batch_timeout_micros: { value: 1500 },
        max_enqueued_batches < value: 4 >
        num_batch_threads { value: 3 };
        thread_pool_name { value: "model_server_batch_threads" }
        allowed_batch_sizes: 2
        allowed_batch_sizes: [4, 8]
        pad_variable_length_inputs: false
        enable_large_batch_splitting { value: false }
        """
    )
    assert p == BatchingParameters(
        max_batch_size=8,
        batch_timeout_micros=1500,
        max_enqueued_batches=4,
        num_batch_threads=3,
        thread_pool_name="model_server_batch_threads",
        allowed_batch_sizes=(2, 4, 8),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size { value: 8 }\nmax_batch_sise { value: 8 }", "line 2: unknown field"),
        ("max_batch_size { value: 8 }\n\nnum_batch_threads { value 2 }", "line 3: expected ':'"),
        ("max_batch_size { value: eight }", "line 1: max_batch_size takes an integer"),
        ("max_batch_size { value: 8 }\nmax_batch_size { value: 9 }", "line 2: non-repeated"),
        ("max_batch_size {\n value: 8", "expected '}', found end of file"),
        ("max_batch_size { value: 8 } $", "line 1: unexpected character '$'"),
        ("max_batch_size { size: 8 }", "line 1: max_batch_size has no field 'size'"),
    ],
)
def test_syntax_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(BatchingConfigError, match=re.escape(message)):
        parse_batching_parameters(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "max_batch_size { value: 8 } allowed_batch_sizes: 2 allowed_batch_sizes: 4",
            "Last entry in allowed_batch_sizes must match max_batch_size; last entry was 4; "
            "expected 8",
        ),
        (
            "max_batch_size { value: 8 } allowed_batch_sizes: 4 allowed_batch_sizes: 4 "
            "allowed_batch_sizes: 8",
            "strictly increasing",
        ),
        ("max_batch_size { value: 0 }", "max_batch_size must be positive; was 0"),
        ("num_batch_threads { value: 0 }", "num_batch_threads must be positive"),
        ("max_enqueued_batches { value: -1 }", "max_enqueued_batches must be positive"),
        ("batch_timeout_micros { value: -5 }", "batch_timeout_micros must be non-negative"),
        ("pad_variable_length_inputs: true", "pad_variable_length_inputs: true is not supported"),
        ("enable_large_batch_splitting { value: true }", "is not supported"),
    ],
)
def test_tf_servings_validation(text: str, message: str) -> None:
    with pytest.raises(BatchingConfigError, match=re.escape(message)):
        parse_batching_parameters(text)


def test_a_missing_or_bad_file_fails_in_one_sentence_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.config"
    with pytest.raises(
        BatchingConfigError, match=re.escape(f"batching parameters file {missing} does not")
    ):
        load_batching_parameters(missing)
    bad = tmp_path / "bad.config"
    bad.write_text("max_batch_size { value: 2 }\nfoo: 1\n")
    with pytest.raises(BatchingConfigError, match=re.escape(f"{bad}: line 2: unknown field 'foo'")):
        load_batching_parameters(bad)


def test_the_cli_flags_override_the_settings() -> None:
    from pipelines.cli import build_parser

    a = build_parser().parse_args(
        ["serve", "--enable_batching", "--batching_parameters_file", "/x/b.config"]
    )
    assert a.enable_batching is True and a.batching_parameters_file == "/x/b.config"
    assert build_parser().parse_args(["serve", "--enable_batching=false"]).enable_batching is False
    assert build_parser().parse_args(["serve"]).enable_batching is None  # the setting decides


def test_the_local_plane_passes_the_flags_to_its_replicas(tmp_path: Path) -> None:
    from pipelines.config import DataPlaneSettings, ServingSettings
    from pipelines.serving.dataplane.local import LocalPlane

    cfg = DataPlaneSettings()
    off = LocalPlane(ServingSettings(base_dir=str(tmp_path)), cfg, "m")
    assert off.replica_flags() == []
    assert off.replica("stable-0").extra_args == []
    on = LocalPlane(
        ServingSettings(
            base_dir=str(tmp_path), enable_batching=True, batching_parameters_file="b.config"
        ),
        cfg,
        "m",
    )
    assert on.replica_flags() == [
        "--enable_batching",
        "--batching_parameters_file",
        str(Path("b.config").resolve()),
    ]
    assert on.replica("stable-0").extra_args == on.replica_flags()
