"""Server-side request batching for ``mlops serve``, with TF Serving's ``--enable_batching`` and
``--batching_parameters_file`` semantics: the same text-proto file production mounts, the same
queue (SharedBatchScheduler) and the same merge, pad and split (BatchingSession)."""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.serving.errors import ServingError

# What production mounts (infra/k8s/base/tf-serving.yaml); the default of
# serving.batching_parameters_file when the repository is checked out.
REPO_BATCHING_FILE = (
    Path(__file__).resolve().parents[2] / "infra" / "tf-serving" / "batching.config"
)

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"

Inputs = dict[str, np.ndarray]
RunFn = Callable[[Inputs], Inputs]


def _max_parallelism() -> int:
    """TensorFlow's ``port::MaxParallelism()``: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's ``BatchingParameters`` (session_bundle_config.proto). An omitted field takes
    the default of the TF struct it configures, as TF Serving does; those are copied here from
    tensorflow/core/kernels/batching_util/shared_batch_scheduler.h (``QueueOptions`` and
    ``Options``)."""

    max_batch_size: int = 1000
    """Most rows in one batch (QueueOptions::max_batch_size = 1000); a bigger request is refused."""
    batch_timeout_micros: int = 0
    """How long a non-full batch waits for more rows (QueueOptions default 0: no wait)."""
    max_enqueued_batches: int = 10
    """Batches the queue holds, the open one included, before refusing (QueueOptions: 10)."""
    num_batch_threads: int = field(default_factory=_max_parallelism)
    """Threads running batches (Options: port::MaxParallelism(), i.e. the usable CPUs)."""
    thread_pool_name: str = "batch_threads"
    """Name prefix of the batch threads (Options::thread_pool_name)."""
    allowed_batch_sizes: tuple[int, ...] = ()
    """Sizes a batch is padded up to (BatchingSession; empty = no padding)."""
    pad_variable_length_inputs: bool = False
    """TF Serving's padding of ragged inputs: not supported here (parsing True is an error)."""

    def __post_init__(self) -> None:
        validate(self)


def validate(p: BatchingParameters) -> None:
    """TF Serving's checks (SharedBatchScheduler::Create/AddQueue, BatchingSession), plus the
    ones that only make sense here; each error is one sentence naming the field."""
    if p.max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive; was {p.max_batch_size}")
    if p.batch_timeout_micros < 0:
        raise ValueError(f"batch_timeout_micros must be non-negative; was {p.batch_timeout_micros}")
    if p.max_enqueued_batches < 1:
        raise ValueError(f"max_enqueued_batches must be positive; was {p.max_enqueued_batches}")
    if p.num_batch_threads < 1:
        raise ValueError(f"num_batch_threads must be positive; was {p.num_batch_threads}")
    sizes = list(p.allowed_batch_sizes)
    if sizes:
        if sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(sizes)):
            raise ValueError(
                "allowed_batch_sizes entries must be positive and strictly increasing; were "
                f"{sizes}"
            )
        if sizes[-1] != p.max_batch_size:
            raise ValueError(
                "Last entry in allowed_batch_sizes must match max_batch_size; last entry was "
                f"{sizes[-1]}; expected {p.max_batch_size}"
            )
    if p.pad_variable_length_inputs:
        raise ValueError(
            "pad_variable_length_inputs: true is not supported by mlops serve (requests of "
            "different non-batch shapes are run as separate batches instead)"
        )


# -- the text-proto file ---------------------------------------------------------------------
class BatchingConfigError(ValueError):
    """A batching parameters file that does not parse or validate; the message names the line."""


_TOKEN = re.compile(
    r"""\s*(?:(?P<comment>\#[^\n]*)|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<number>[-+]?\d+(?:\.\d*)?)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[{}:\[\],;<>]))""",
    re.VERBOSE,
)
# field -> kind: "int"/"bool"/"str" are google.protobuf wrappers ({ value: ... }); "ints" is the
# repeated int64, "plain_bool" the bare bool.
_FIELDS = {
    "max_batch_size": "int",
    "batch_timeout_micros": "int",
    "max_enqueued_batches": "int",
    "num_batch_threads": "int",
    "thread_pool_name": "str",
    "allowed_batch_sizes": "ints",
    "pad_variable_length_inputs": "plain_bool",
    # Newer TF Serving fields: accepted only at the values that mean "off".
    "enable_large_batch_splitting": "bool",
    "max_execution_batch_size": "int",
}


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    """(kind, text, line) for each token; a character that starts none fails naming its line."""
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            rest = text[pos:]
            if not rest.strip():
                return
            line += text[pos : pos + len(rest) - len(rest.lstrip())].count("\n")
            raise BatchingConfigError(f"line {line}: unexpected character {rest.lstrip()[0]!r}")
        line += text[pos : m.start(m.lastgroup or 0)].count("\n")
        kind = m.lastgroup or ""
        if kind != "comment":
            yield kind, m.group(kind), line
        pos = m.end()


class _Parser:
    def __init__(self, text: str):
        self.tokens = list(_tokens(text))
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def line(self) -> int:
        tok = self.peek()
        return tok[2] if tok else (self.tokens[-1][2] if self.tokens else 1)

    def next(self, what: str) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise BatchingConfigError(f"line {self.line()}: expected {what}, found end of file")
        self.i += 1
        return tok

    def expect(self, *texts: str) -> str:
        _, value, line = self.next(" or ".join(repr(t) for t in texts))
        if value not in texts:
            raise BatchingConfigError(
                f"line {line}: expected {' or '.join(repr(t) for t in texts)}, found {value!r}"
            )
        return value

    def accept(self, text: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[0] == "punct" and tok[1] == text:
            self.i += 1
            return True
        return False

    def scalar(self, kind: str, name: str) -> Any:
        tkind, value, line = self.next(f"a value for {name}")
        if kind in ("int", "ints"):
            if tkind != "number" or not re.fullmatch(r"[-+]?\d+", value):
                raise BatchingConfigError(f"line {line}: {name} takes an integer, found {value!r}")
            return int(value)
        if kind in ("bool", "plain_bool"):
            if value in ("true", "True", "t", "1"):
                return True
            if value in ("false", "False", "f", "0"):
                return False
            raise BatchingConfigError(f"line {line}: {name} takes true or false, found {value!r}")
        if tkind != "string":
            raise BatchingConfigError(f"line {line}: {name} takes a quoted string, found {value!r}")
        return value[1:-1].encode().decode("unicode_escape")

    def wrapper(self, kind: str, name: str) -> Any:
        """``name { value: V }`` (or ``name: < value: V >``), the google.protobuf wrappers."""
        self.accept(":")
        close = "}" if self.expect("{", "<") == "{" else ">"
        if self.accept(close):
            return {"int": 0, "bool": False, "str": ""}[kind]  # an empty wrapper holds the default
        _, key, line = self.next("value")
        if key != "value":
            raise BatchingConfigError(f"line {line}: {name} has no field {key!r} (only 'value')")
        self.expect(":")
        value = self.scalar(kind, name)
        self.accept(",") or self.accept(";")
        self.expect(close)
        return value

    def parse(self) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        while self.peek() is not None:
            tkind, name, line = self.next("a field name")
            if tkind != "ident":
                raise BatchingConfigError(f"line {line}: expected a field name, found {name!r}")
            kind = _FIELDS.get(name)
            if kind is None:
                raise BatchingConfigError(
                    f"line {line}: unknown field {name!r} in BatchingParameters (known: "
                    f"{', '.join(_FIELDS)})"
                )
            if kind == "ints":
                self.expect(":")
                values = seen.setdefault(name, [])
                if self.accept("["):
                    while not self.accept("]"):
                        values.append(self.scalar(kind, name))
                        self.accept(",")
                else:
                    values.append(self.scalar(kind, name))
            else:
                if name in seen:
                    raise BatchingConfigError(
                        f"line {line}: non-repeated field {name!r} is specified multiple times"
                    )
                if kind == "plain_bool":
                    self.expect(":")
                    seen[name] = self.scalar(kind, name)
                else:
                    seen[name] = self.wrapper(kind, name)
            self.accept(",") or self.accept(";")
        return seen


def parse_batching_parameters(text: str) -> BatchingParameters:
    """Parse TF Serving's ASCII ``BatchingParameters`` (what ``--batching_parameters_file``
    holds) and validate it as TF Serving does. Omitted fields take TF Serving's defaults."""
    fields = _Parser(text).parse()
    if fields.pop("enable_large_batch_splitting", False):
        raise BatchingConfigError(
            "enable_large_batch_splitting: true is not supported by mlops serve (a request "
            "larger than max_batch_size is refused, TF Serving's default)"
        )
    if "max_execution_batch_size" in fields:
        raise BatchingConfigError(
            "max_execution_batch_size is not supported by mlops serve (it only applies with "
            "enable_large_batch_splitting)"
        )
    if "allowed_batch_sizes" in fields:
        fields["allowed_batch_sizes"] = tuple(fields["allowed_batch_sizes"])
    try:
        return BatchingParameters(**fields)
    except ValueError as exc:
        raise BatchingConfigError(str(exc)) from None


def load_batching_parameters(path: str | Path | None) -> tuple[Path, BatchingParameters]:
    """The file named by ``--batching_parameters_file`` / ``serving.batching_parameters_file``,
    or, when None, the repository's ``infra/tf-serving/batching.config`` (production's file);
    returns the path read and its parameters. Errors are one sentence naming the file."""
    file = Path(path) if path else REPO_BATCHING_FILE
    if not file.is_file():
        hint = (
            ""
            if path
            else " (serving.batching_parameters_file is unset, so the repository's file is used;"
            " set it or pass --batching_parameters_file)"
        )
        raise BatchingConfigError(f"batching parameters file {file} does not exist{hint}")
    try:
        return file, parse_batching_parameters(file.read_text())
    except BatchingConfigError as exc:
        raise BatchingConfigError(f"{file}: {exc}") from None


# -- the scheduler ---------------------------------------------------------------------------
class _Task:
    """One request: its inputs, its rows, and where its outputs (or error) go."""

    __slots__ = ("done", "error", "inputs", "outputs", "size")

    def __init__(self, inputs: Inputs, size: int):
        self.inputs, self.size = inputs, size
        self.done = threading.Event()
        self.outputs: Inputs | None = None
        self.error: BaseException | None = None


class _Batch:
    __slots__ = ("size", "started", "tasks")

    def __init__(self) -> None:
        self.tasks: list[_Task] = []
        self.size = 0
        self.started = 0.0  # monotonic time its first task arrived


def task_size(inputs: Inputs) -> int:
    """The rows of a request: the 0th dimension every input shares (BatchingSession's
    ComputeInputSize, with its messages)."""
    if not inputs:
        raise ServingError(
            "INVALID_ARGUMENT", "Batching session Run() must have at least one input tensor"
        )
    sizes = set()
    for value in inputs.values():
        if value.ndim == 0:
            raise ServingError(
                "INVALID_ARGUMENT",
                "Batching session Run() input tensors must have at least one dimension",
            )
        sizes.add(value.shape[0])
    if len(sizes) != 1:
        raise ServingError(
            "INVALID_ARGUMENT",
            "Batching session Run() input tensors must have equal 0th-dimension size",
        )
    return sizes.pop()


class Batcher:
    """One servable signature's batching queue and its ``num_batch_threads`` threads.

    The queue is TF Serving's SharedBatchScheduler queue: a deque of batches whose last one is
    open. A task that does not fit the open batch closes it and opens a new one, unless the
    deque already holds ``max_enqueued_batches`` batches: then it is refused at once with
    UNAVAILABLE, so an overloaded replica sheds load instead of queueing without bound. A batch
    being run no longer counts. An open batch becomes runnable when full, when its first task
    has waited ``batch_timeout_micros``, or when the batcher stops. ``run`` gets the merged
    (and padded) inputs and returns outputs whose 0th dimension matches; each task gets its own
    rows back, or the batch's exception.
    """

    def __init__(self, run: RunFn, params: BatchingParameters, name: str = ""):
        self.run, self.params = run, params
        self._cond = threading.Condition()
        self._batches: deque[_Batch] = deque([_Batch()])
        self._closed = False
        self._timeout = params.batch_timeout_micros / 1e6
        # batches run, requests in them, their rows and padding rows: what batching achieved.
        self.stats = {"batches": 0, "tasks": 0, "rows": 0, "padding_rows": 0}
        prefix = f"{params.thread_pool_name}_{name}" if name else params.thread_pool_name
        self._threads = [
            threading.Thread(target=self._loop, name=f"{prefix}_{i}", daemon=True)
            for i in range(params.num_batch_threads)
        ]
        for t in self._threads:
            t.start()

    # -- request side ----------------------------------------------------------------------
    def submit(self, inputs: Inputs) -> Inputs:
        """Run ``inputs`` (arrays sharing their 0th dimension) as part of a batch; blocks until
        its outputs are back. Raises ServingError for a refused task, else what ``run`` raised."""
        size = task_size(inputs)
        if size > self.params.max_batch_size:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"Task size {size} is larger than maximum batch size {self.params.max_batch_size}",
            )
        task = _Task(inputs, size)
        with self._cond:
            if self._closed:
                raise ServingError(
                    "UNAVAILABLE", "The batch scheduling queue was closed: its servable unloaded"
                )
            open_batch = self._batches[-1]
            if open_batch.size + size > self.params.max_batch_size:
                if len(self._batches) >= self.params.max_enqueued_batches:
                    raise ServingError("UNAVAILABLE", QUEUE_FULL)
                open_batch = _Batch()
                self._batches.append(open_batch)
            if not open_batch.tasks:
                open_batch.started = time.monotonic()
            open_batch.tasks.append(task)
            open_batch.size += size
            self._cond.notify()
        task.done.wait()
        error = task.error
        if isinstance(error, ServingError):  # one exception object per request thread
            raise ServingError(error.code, error.message) from error
        if error is not None:
            raise error
        assert task.outputs is not None
        return task.outputs

    def queued_batches(self) -> int:
        """Batches waiting (the open one included when it holds a task); for tests and metrics."""
        with self._cond:
            return len(self._batches) - (0 if self._batches[-1].tasks else 1)

    # -- batch threads ---------------------------------------------------------------------
    def _next_batch(self) -> _Batch | None:
        """The front batch once runnable, else None; blocks. None also means "stopped and
        drained": the thread then exits."""
        with self._cond:
            while True:
                if len(self._batches) > 1:
                    batch = self._batches.popleft()
                    # Work is left (a closed batch, or an open one whose timeout nobody else
                    # may be timing): wake another thread to look at it.
                    if len(self._batches) > 1 or self._batches[0].tasks:
                        self._cond.notify()
                    return batch
                open_batch = self._batches[0]
                if open_batch.tasks:
                    wait = open_batch.started + self._timeout - time.monotonic()
                    if self._closed or open_batch.size >= self.params.max_batch_size or wait <= 0:
                        self._batches[0] = _Batch()
                        return open_batch
                    self._cond.wait(wait)
                elif self._closed:
                    return None
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            # Tasks whose non-batch shapes or dtypes differ cannot be concatenated: each group
            # runs on its own, so one odd request does not fail the others (TF Serving fails
            # the whole batch).
            groups: dict[tuple[Any, ...], list[_Task]] = {}
            for task in batch.tasks:
                key = tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(task.inputs.items()))
                groups.setdefault(key, []).append(task)
            for tasks in groups.values():
                self._process(tasks)

    def _padded_size(self, rows: int) -> int:
        return next((s for s in self.params.allowed_batch_sizes if s >= rows), rows)

    def _process(self, tasks: list[_Task]) -> None:
        try:
            rows = sum(t.size for t in tasks)
            padded = self._padded_size(rows)
            if len(tasks) == 1 and padded == rows:
                merged = tasks[0].inputs  # BatchingSession's fast path: nothing to merge
            else:
                merged = {}
                for name, first in tasks[0].inputs.items():
                    parts = [t.inputs[name] for t in tasks]
                    if padded > rows:
                        # BatchingSession pads with the first row of the first task: a valid row
                        # of this very batch, so the model cannot fail on the padding.
                        parts.append(np.repeat(first[:1], padded - rows, axis=0))
                    merged[name] = np.concatenate(parts, axis=0)
            with self._cond:
                self.stats["batches"] += 1
                self.stats["tasks"] += len(tasks)
                self.stats["rows"] += rows
                self.stats["padding_rows"] += padded - rows
            outputs = self.run(merged)
            for key, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != padded:
                    raise ServingError(
                        "FAILED_PRECONDITION",
                        f"Batched output tensor {key!r}'s 0th dimension does not equal the sum "
                        "of the 0th dimension sizes of the input tensors",
                    )
            start = 0
            for t in tasks:
                t.outputs = {k: v[start : start + t.size] for k, v in outputs.items()}
                start += t.size
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
            for t in tasks:
                t.error = exc
        finally:
            for t in tasks:
                t.done.set()

    # -- life cycle ------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> None:
        """Refuse new tasks, run the queued ones (TF Serving's CloseAndWaitUntilEmpty), then
        join the threads, so an unloaded servable leaves no thread behind."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)
