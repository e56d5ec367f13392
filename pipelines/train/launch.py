"""Local launcher: N torchrun node agents (c10d rendezvous on 127.0.0.1) as child processes.

Their output is streamed with a ``[node i]`` prefix; the first failing node's error fails the
call; no process outlives the call (each agent runs in its own process group, killed on exit).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
RESULT_MARK = "MLOPS_TRAIN_RESULT "


class TrainingFailed(RuntimeError):
    """A node exited non-zero; carries that node's last output lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(
    nodes: int,
    procs_per_node: int,
    endpoint: str,
    job_id: str,
    max_restarts: int,
    entry_args: list[str],
) -> list[str]:
    """One node agent's command line; the same line runs in a Kubernetes pod."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={job_id}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=1",
        "--rdzv-conf=join_timeout=120,last_call_timeout=5,keep_alive_interval=1,"
        "keep_alive_max_attempt=2",
        "-m",
        "pipelines.train",
        *entry_args,
    ]


@dataclass
class _Node:
    index: int
    proc: subprocess.Popen[str]
    tail: deque[str]
    thread: threading.Thread


def _pump(
    node_index: int, stream, tail: deque[str], sink: Callable[[str], None], results: list[dict]
) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        tail.append(line)
        if RESULT_MARK in line:
            results.append(json.loads(line.split(RESULT_MARK, 1)[1]))
        sink(f"[node {node_index}] {line}")
    stream.close()


def _die_with_parent() -> None:
    """Linux: the agent gets SIGTERM if the launching process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _kill(nodes: list[_Node]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            try:
                os.killpg(n.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for n in nodes:
        try:
            n.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(n.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            n.proc.wait()


def launch_local(
    entry_args: list[str],
    nodes: int,
    procs_per_node: int = 1,
    max_restarts: int = 0,
    rdzv_port: int = 0,
    env: dict[str, str] | None = None,
    sink: Callable[[str], None] | None = None,
    timeout_s: float = 3600,
) -> dict:
    """Run the training entrypoint as ``nodes`` torchrun agents; return rank 0's result."""
    sink = sink or (lambda line: log.info("%s", line))
    endpoint = f"127.0.0.1:{rdzv_port or free_port()}"
    job_id = f"mlops-{uuid.uuid4().hex[:8]}"
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    running: list[_Node] = []
    results: list[dict] = []
    try:
        for i in range(nodes):
            cmd = torchrun_command(
                nodes, procs_per_node, endpoint, job_id, max_restarts, entry_args
            )
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=child_env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            tail: deque[str] = deque(maxlen=40)
            t = threading.Thread(
                target=_pump, args=(i, proc.stdout, tail, sink, results), daemon=True
            )
            t.start()
            running.append(_Node(i, proc, tail, t))
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [n.proc.poll() for n in running]
            failed = [n for n, c in zip(running, codes, strict=True) if c not in (None, 0)]
            if failed:
                time.sleep(2)  # let the other agents notice and report
                n = failed[0]
                n.thread.join(timeout=5)
                raise TrainingFailed(
                    f"Training node {n.index} exited with code {n.proc.returncode}. "
                    "Last lines:\n" + "\n".join(n.tail)
                )
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                raise TrainingFailed(f"Training did not finish within {timeout_s:.0f} s.")
            time.sleep(0.2)
        for n in running:
            n.thread.join(timeout=10)
    finally:
        _kill(running)
    if not results:
        raise TrainingFailed("Training finished but rank 0 reported no result.")
    return results[0]
