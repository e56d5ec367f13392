"""``run_group`` stops a command that finished its work but does not exit (Airflow's
LocalExecutor shutdown can hang after the DAG run is over: apache/airflow#67870), and the demo
reads a run's outcome from its ``dags test`` log."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from pipelines.demo import run_finished
from pipelines.processes import run_group, session_members

# Writes the line Airflow writes when the run is over, then hangs the way the executor's
# shutdown does; a child in the same group hangs too.
HANGS_AFTER_ITS_RUN = (
    "import os, subprocess, sys, time\n"
    "print(f'pid={os.getpid()}', flush=True)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('[info] DagRun Finished: dag_id=d, run_id=r, state=success, run_type=manual',"
    " flush=True)\n"
    "time.sleep(600)\n"
)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_command_hung_after_its_run_is_stopped_and_the_run_s_outcome_returned(
    tmp_path: Path,
) -> None:
    log = tmp_path / "day.log"
    log.write_text("an earlier run's lines: DagRun Finished: state=failed\n")
    offset = log.stat().st_size
    began = time.monotonic()
    code = run_group(
        [sys.executable, "-c", HANGS_AFTER_ITS_RUN],
        dict(os.environ),
        log,
        timeout=60,
        finished=lambda: run_finished(log, offset),
        exit_grace=1.0,
    )
    assert code == 0  # this run's state, not the earlier run's line before the offset
    assert time.monotonic() - began < 30
    text = log.read_text()
    assert "the work was done but the command had not exited 1 s later: stopped" in text
    pgid = int(text.split("pid=", 1)[1].split()[0])
    assert _group_gone(pgid)  # the command and its child


def test_a_command_that_exits_keeps_its_own_code(tmp_path: Path) -> None:
    code = run_group(
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        dict(os.environ),
        tmp_path / "log",
        timeout=60,
        finished=lambda: 0,
        exit_grace=30.0,
    )
    assert code == 3


def test_a_timeout_still_stops_a_command_whose_run_never_finishes(tmp_path: Path) -> None:
    code = run_group(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        dict(os.environ),
        tmp_path / "log",
        timeout=2,
        finished=lambda: None,
    )
    assert code == 124


def test_run_finished_reads_the_final_state_of_the_run(tmp_path: Path) -> None:
    log = tmp_path / "day.log"
    assert run_finished(log) is None  # no log yet
    log.write_text("Marking run <DagRun ...> failed\n")
    assert run_finished(log) is None
    log.write_text("x\n[info] DagRun Finished: dag_id=d, run_id=r, state=failed, y=z\nmore\n")
    assert run_finished(log) == 1
    log.write_text("[info] DagRun Finished: dag_id=d, state=success, run_type=manual\n")
    assert run_finished(log) == 0


# Forks a child into a process group of its own, as Airflow's task supervisor does with each
# task process, then exits: the child would run on as an orphan that no signal to the
# command's group reaches.
LEAVES_A_TASK_IN_ITS_OWN_GROUP = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
    " process_group=0)\n"
    "print(f'child={child.pid} sid={os.getsid(0)}', flush=True)\n"
)


def test_a_task_process_in_a_group_of_its_own_is_stopped_with_the_command(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    code = run_group(
        [sys.executable, "-c", LEAVES_A_TASK_IN_ITS_OWN_GROUP], dict(os.environ), log, timeout=60
    )
    assert code == 0
    first, *rest = log.read_text().splitlines()
    fields = dict(x.split("=") for x in first.split())
    child, sid = int(fields["child"]), int(fields["sid"])
    assert f"stopped 1 process(es) of the command's session in other groups: [{child}]" in (
        "\n".join(rest)
    )
    assert session_members(sid) == []  # nothing of the command's session is left
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
