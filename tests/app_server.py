"""Start ``python app.py`` on a free loopback port for the tests that drive the running app."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from demo import runs

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 180
SERVER_STOP_TIMEOUT_S = 30


@dataclass
class AppServer:
    url: str
    process: subprocess.Popen
    folder: Path
    log_path: Path

    @property
    def runs_root(self) -> Path:
        return self.folder / runs.RUNS_ROOT.name

    def rss_mib(self) -> float:
        """Return the server's resident memory in MiB, read from /proc."""
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"No VmRSS line in /proc/{self.process.pid}/status")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_app(folder: Path) -> Iterator[AppServer]:
    """Run the app on 127.0.0.1 until the block ends, with its temp directory and log in ``folder``.

    TMPDIR moves the app's run folders, example copies and Gradio's file cache into ``folder``. The server
    is stopped with SIGINT, as Ctrl+C would, so Gradio runs its shutdown.
    """
    port = free_port()
    log_path = folder / "server.log"
    environment = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                       GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                       TMPDIR=str(folder))
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO_ROOT, env=environment,
                                   stdout=log, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}/", process, folder, log_path)
    try:
        _wait_until_up(server)
        yield server
    finally:
        _stop(server)


def _wait_until_up(server: AppServer) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"app.py exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer at {server.url} within {SERVER_START_TIMEOUT_S} s:\n"
                            f"{server.log_tail()}")
            time.sleep(1)


def _stop(server: AppServer) -> None:
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
