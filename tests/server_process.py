"""A real `duospec serve` process on a free loopback port, for the server tests.

Every process gets a deadline and is killed in `stop` (a `finally` in each fixture), with SIGINT's
disposition set explicitly in the child, so no test leaves a server running, whatever happens.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 180


def _default_sigint() -> None:  # in the child, before exec: a test run under nohup must not pass on an ignored SIGINT
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServerProcess:
    """Starts `python -m duospec serve ... --port 0` and reads the port it prints."""

    def __init__(self, args: list[str], cache: Path, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "PYTHONPATH": str(REPO), "DUOSPEC_CACHE": str(cache), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "duospec", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, preexec_fn=_default_sigint,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", self.log)
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise RuntimeError(f"the server exited with {self.process.returncode} before listening:\n{self.log}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not listen within {STARTUP_SECONDS} s:\n{self.log}")

    def children(self) -> list[int]:
        """Process ids of the server's child processes (a Duo draft process, for one)."""
        pids = []
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            pids += [int(pid) for pid in children.read_text().split()]
        return pids

    def wait_for_log(self, pattern: str, seconds: float = 30) -> re.Match:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} did not appear in the server's log within {seconds} s:\n{self.log}")

    def stop(self, seconds: float = 30) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `seconds`; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(5)
        return self.process.returncode
