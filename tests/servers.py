"""Real servers for the tests, on 127.0.0.1: a free port, a long-running command in its own process group with its
output in a log, waiting until it answers, and stopping it with everything it started.

Import as `from tests.servers import ...` (pyproject.toml puts the repository's root on the tests' sys.path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.is_file() else "(no log)"
    return f"--- last {lines} lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def start(command: list[str], cwd: Path, env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """`command` in its own process group (so `stop` ends what it starts too), its output in `log`."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a process started by `start`, with everything it started, politely first."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def wait_until_answers(url: str, process: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    """Wait until `url` answers 200; fail the test with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode} while starting\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer {url} within {timeout_s:.0f} s\n{tail(log)}")
        time.sleep(0.5)


@contextlib.contextmanager
def serving(command: list[str], cwd: Path, env: Mapping[str, str], log: Path, url: str, timeout_s: float = 120,
            what: str = "the server") -> Iterator[subprocess.Popen]:  # fmt: skip
    """`start` the command, wait until `url` answers, yield the process and `stop` it at the end."""
    process = start(command, cwd, env, log)
    try:
        wait_until_answers(url, process, log, timeout_s, what)
        yield process
    finally:
        stop(process)
