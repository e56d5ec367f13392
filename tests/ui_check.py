"""What a user sees in the Airflow UI after ``make demo``: a task's log, through Airflow's own
API server on the demo's home, as the UI fetches it, and (``make ui-check``) as headless
Chromium renders the page, saved as a screenshot.

``python -m tests.ui_check --home .mlops --out .mlops/ui/validate_data.png``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

DAG_ID = "mlops_training_pipeline"
ROOT = Path(__file__).resolve().parents[1]


def airflow_env(mlops_home: Path, airflow_home: Path, port: int) -> dict[str, str]:
    """``make airflow``'s settings (this project's DAGs, the API on loopback; the metadata DB
    is set by ``airflow_local.metadata_db``), every user an admin: no login page to script."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))},
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "MLOPS_HOME": str(mlops_home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@contextmanager
def api_server(home: Path, port: int) -> Iterator[str]:
    """``airflow api-server`` on a demo home's metadata DB (its PostgreSQL, started for the
    while); its URL. The whole process group and the database are stopped on exit."""
    from pipelines.airflow_local import metadata_db
    from tests.processes import http_ok, running

    base = f"http://127.0.0.1:{port}"
    airflow = str(Path(sys.executable).parent / "airflow")
    with (
        metadata_db(home, airflow_env(home, home / "airflow", port)) as env,
        running(
            [airflow, "api-server"],
            env,
            home / "ui-check-api-server.log",
            lambda: http_ok(f"{base}/api/v2/monitor/health"),
            240,
            "airflow api-server",
        ),
    ):
        yield base


def run_for(base: str, date: str) -> dict[str, Any]:
    """The latest run of the DAG for a day (the demo's runs name it in their conf)."""
    runs = _runs(base, order_by="-start_date")
    mine = [r for r in runs if (r.get("conf") or {}).get("date") == date]
    if not mine:
        raise LookupError(f"no run of {DAG_ID} for {date}: {[r['conf'] for r in runs]}")
    return dict(mine[0])


def task_log(base: str, run_id: str, task_id: str, try_number: int = 1) -> list[str]:
    """The task log's lines as the UI receives them (one event per line)."""
    resp = requests.get(
        f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
        headers={"Accept": "application/json"},
        params={"full_content": "true"},
        timeout=60,
    )
    resp.raise_for_status()
    content = resp.json()["content"]
    return [c if isinstance(c, str) else str(c.get("event", "")) for c in content]


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
]


def screenshot(url: str, out: Path) -> None:
    """Headless Debian Chromium renders ``url`` and saves it (flags: no network chatter on this
    closed machine, a throwaway profile)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=20000",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {out}")


# The trigger dialog's state: its Trigger button (enabled or not), fields the form marks
# invalid, and the visible text (for the error message, if any).
_DIALOG = (
    "[...document.querySelectorAll('[role=dialog]')].find(d => d.innerText.includes('Trigger Dag'))"
)
_DIALOG_STATE = """(() => {
  const d = DIALOG;
  if (!d) return null;
  const buttons = [...d.querySelectorAll('button')].filter(b => b.innerText.trim() === 'Trigger');
  return {
    trigger: buttons.map(b => !b.disabled),
    invalid: [...d.querySelectorAll('[aria-invalid=true], [data-invalid]')].map(
      e => e.getAttribute('name') || e.id || e.tagName),
    text: d.innerText.slice(0, 4000),
  };
})()""".replace("DIALOG", _DIALOG)


class Browser:
    """Headless Chromium driven over the DevTools protocol (navigate, evaluate, click,
    screenshot); closed with its throwaway profile on exit."""

    def __init__(self) -> None:
        from pipelines.ports import free_port

        self.port = free_port()
        self.profile = tempfile.TemporaryDirectory()
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        self.proc = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile.name}",
                f"--remote-debugging-port={self.port}",
                "--remote-allow-origins=*",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.ws: Any = None
        self.seq = 0

    def __enter__(self) -> Browser:
        import time

        import websocket

        deadline = time.monotonic() + 60
        while True:
            try:
                pages = requests.get(f"http://127.0.0.1:{self.port}/json", timeout=5).json()
                page = next(p for p in pages if p.get("type") == "page")
                break
            except (requests.RequestException, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError("Chromium's DevTools endpoint did not come up") from None
                time.sleep(0.5)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.ws is not None:
            self.ws.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.profile.cleanup()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        import json

        self.seq += 1
        self.ws.send(json.dumps({"id": self.seq, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.seq:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"not true within {timeout} s: {expression[:200]}")

    def screenshot(self, out: Path) -> None:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))


def submit_trigger_form(base: str, out: Path) -> dict[str, Any]:
    """Open the DAG's Trigger dialog as a user does and submit it with no field touched; the
    dialog's state as it opened (screenshot in ``out``) and the run it created."""
    import time

    before = {r["dag_run_id"] for r in _runs(base)}
    with Browser() as b:
        b.call("Page.enable")
        b.call("Page.navigate", url=f"{base}/dags/{DAG_ID}")
        b.wait_for(
            "[...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Trigger')"
        )
        b.evaluate(
            "[...document.querySelectorAll('button')]"
            ".find(b => b.innerText.trim() === 'Trigger').click()"
        )
        state = b.wait_for(_DIALOG_STATE)
        time.sleep(2)  # the form validates its fields as it renders them
        state = b.evaluate(_DIALOG_STATE)
        b.screenshot(out)
        button = (
            f"[...{_DIALOG}.querySelectorAll('button')]"
            ".filter(b => b.innerText.trim() === 'Trigger').pop()"
        )
        b.evaluate(f"{button}.scrollIntoView()")
        time.sleep(1)
        b.screenshot(out.with_name(f"{out.stem}_end{out.suffix}"))  # the form's end, its button
        if not any(state["trigger"]):
            return {"opened": state, "run": None}
        b.evaluate(f"{button}.click()")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = [r for r in _runs(base) if r["dag_run_id"] not in before]
            if new:
                return {"opened": state, "run": new[0]}
            time.sleep(1)
    return {"opened": state, "run": None}


def _runs(base: str, **params: str) -> list[dict[str, Any]]:
    """The DAG's runs (the latest 100) as the UI's API lists them."""
    resp = requests.get(
        f"{base}/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100, **params}, timeout=30
    )
    resp.raise_for_status()
    return list(resp.json()["dag_runs"])


def main(argv: list[str] | None = None) -> int:
    from pipelines.ports import free_port

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=Path(os.environ.get("MLOPS_HOME", ".mlops")))
    p.add_argument("--date", default="2026-11-03", help="the demo's blocked day")
    p.add_argument("--task", default="validate_data")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    home = a.home.resolve()
    out = a.out or home / "ui" / f"{a.task}.png"
    with api_server(home, free_port()) as base:
        run = run_for(base, a.date)
        lines = task_log(base, run["dag_run_id"], a.task)
        print(f"{a.task} of {run['dag_run_id']} ({run['state']}): {len(lines)} log lines")
        for line in lines:  # the gate's report, as the log page shows it
            if line.startswith("The data gate blocked"):
                print("  " + line.replace("\n", "\n  "))
        url = f"{base}/dags/{DAG_ID}/runs/{run['dag_run_id']}/tasks/{a.task}"
        screenshot(url, out)
        print(f"screenshot of {url}: {out}")
        form = submit_trigger_form(base, out.with_name("trigger_form.png"))
        print(f"trigger form as it opens: {out.with_name('trigger_form.png')}")
        if form["run"] is None:
            print(f"the trigger form could not be submitted as it opened: {form['opened']}")
            return 1
        print(f"submitted with no field touched: run {form['run']['dag_run_id']} (queued)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
