"""A real local Prefect server (with its scheduler) in a temporary home, for tests and benchmarks.

Prefect's own test harness starts an ephemeral server without services, so nothing there fires a schedule;
this runs `prefect server start` as a user would.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"Prefect server exited ({server.returncode}):\n{Path(log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {api_url} not healthy after {timeout} s")


@contextlib.contextmanager
def local_server(scheduler_loop_s: float = 5) -> Iterator[dict[str, str]]:
    """Start a Prefect server on a free port; yields the environment that points Prefect clients at it
    (PREFECT_HOME, PREFECT_API_URL). scheduler_loop_s: how often its scheduler looks for runs to schedule."""
    with tempfile.TemporaryDirectory(prefix="prefect-") as home:
        port = free_port()
        env = {
            "PREFECT_HOME": home,
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(scheduler_loop_s),
        }
        log_path = Path(home, "server.log")
        log = log_path.open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=os.environ | env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # whatever it starts is stopped with it, as a group
        )
        try:
            wait_healthy(env["PREFECT_API_URL"], server, log_path)
            yield env
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            log.close()


def require_api() -> None:
    """A configured Prefect server (PREFECT_API_URL) answers /health within seconds, or this exits with one line
    naming it, before any work: Prefect's client would retry, then end in a traceback. Without one, a flow
    starts Prefect's temporary local server itself."""
    from prefect.settings import PREFECT_API_URL

    from stages.tracking import redacted

    if not (url := PREFECT_API_URL.value()):
        return
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5):
            pass
    except OSError as e:
        raise SystemExit(redacted(f"Prefect server {url} unreachable: {e}", url)) from None
