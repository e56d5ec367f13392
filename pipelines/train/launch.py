"""Local launcher: N torchrun node agents (c10d rendezvous on 127.0.0.1) as child processes.

Their output is streamed with a ``[node i]`` prefix; the first failing node's error fails the
call; no process outlives the call (each agent runs in its own process group, killed on exit).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.ports import free_port
from pipelines.train.result import MalformedResult, parse_result

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """A node exited non-zero; carries that node's last output lines."""


def torchrun_command(
    nodes: int,
    procs_per_node: int,
    endpoint: str,
    job_id: str,
    max_restarts: int,
    entry_args: list[str],
    min_nodes: int | None = None,
    is_host: bool | None = None,
    python: str = sys.executable,
) -> list[str]:
    """One node agent's command line; the same line runs in a Kubernetes pod.

    ``min_nodes < nodes`` makes the job elastic (``--nnodes=MIN:MAX``): a lost node triggers a
    re-rendezvous of the survivors, which restart from the latest checkpoint. ``is_host`` says
    which agent hosts the c10d store; losing that one ends the job (torch elastic's c10d backend
    keeps its store inside an agent), so it is node 0, the one a retry restarts first."""
    lo = min(min_nodes or nodes, nodes)
    rdzv_conf = (
        "join_timeout=120,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=2"
    )
    if is_host is not None:
        rdzv_conf += f",is_host={'true' if is_host else 'false'}"
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={lo}:{nodes}" if lo < nodes else f"--nnodes={nodes}",
        f"--nproc-per-node={procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={job_id}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=1",
        f"--rdzv-conf={rdzv_conf}",
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
    node_index: int,
    stream,
    tail: deque[str],
    sink: Callable[[str], None],
    results: list[dict[str, float]],
) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        tail.append(line)
        try:
            result = parse_result(line)
        except MalformedResult as exc:
            # Keep pumping: a reader that stopped would leave the node blocked on a full pipe.
            sink(f"[launcher] node {node_index}: {exc}")
            result = None
        if result is not None:
            results.append(result)
        sink(f"[node {node_index}] {line}")
    stream.close()


def _die_with_parent() -> None:
    """Linux: the agent gets SIGTERM if the launching process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a node agent and every process under it (its workers may sit in other groups)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _kill(nodes: list[_Node]) -> None:
    alive = [n for n in nodes if n.proc.poll() is None]
    for n in alive:
        try:
            os.killpg(n.proc.pid, signal.SIGTERM)  # the agent stops its workers on SIGTERM
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for n in alive:
        try:
            n.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            kill_tree(n.proc.pid)
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
    min_nodes: int | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> dict[str, float]:
    """Run the training entrypoint as ``nodes`` torchrun agents; return rank 0's result.

    ``entry_args`` are the entrypoint's (``TrainJob.argv()``); ``env`` is added to the agents'
    environment (the secrets, which never go on a command line).

    Fixed-size jobs fail as soon as any node fails. Elastic jobs (``min_nodes < nodes``) outlive
    the loss of non-host nodes: they fail only if the store host (node 0) fails or every node
    exits without a result. ``on_start`` receives the agents' pids (node order)."""
    sink = sink or (lambda line: log.info("%s", line))
    endpoint = f"127.0.0.1:{rdzv_port or free_port()}"
    job_id = f"mlops-{uuid.uuid4().hex[:8]}"
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    elastic = (min_nodes or nodes) < nodes
    running: list[_Node] = []
    results: list[dict[str, float]] = []
    try:
        for i in range(nodes):
            cmd = torchrun_command(
                nodes,
                procs_per_node,
                endpoint,
                job_id,
                max_restarts,
                entry_args,
                min_nodes,
                is_host=(i == 0),
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
        if on_start is not None:
            on_start([n.proc.pid for n in running])
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [n.proc.poll() for n in running]
            failed = [n for n, c in zip(running, codes, strict=True) if c not in (None, 0)]
            fatal = failed and (not elastic or failed[0].index == 0 or None not in codes)
            if fatal and not (elastic and None not in codes and 0 in codes):
                time.sleep(2)  # let the other agents notice and report
                n = failed[0]
                n.thread.join(timeout=5)
                raise TrainingFailed(
                    f"Training node {n.index} exited with code {n.proc.returncode}. "
                    "Last lines:\n" + "\n".join(n.tail)
                )
            if None not in codes:
                break
            if time.monotonic() > deadline:
                raise TrainingFailed(f"Training did not finish within {timeout_s:.0f} s.")
            time.sleep(0.2)
        for n in running:
            n.thread.join(timeout=10)
        for n in running:
            if n.proc.returncode:
                sink(
                    f"[launcher] node {n.index} was lost (exit {n.proc.returncode}); "
                    "the elastic job finished without it"
                )
    finally:
        _kill(running)
    if not results:
        raise TrainingFailed("Training finished but rank 0 reported no result.")
    return results[-1]
