"""A real ``samsegment serve`` process on a free loopback port, for the tests that kill a server
(kill -9 cannot be simulated in a thread) and start it again."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``samsegment serve`` as an administrator would run it: 127.0.0.1, a token file, a port file.

    ``env``: extra environment of the server process (read at every ``start``, so a test can change
    it between a kill and the next start, e.g. the adapter key).
    """

    def __init__(self, workdir: Path, runtime: str = "eager", token: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir, self.runtime = workdir, runtime
        self.token = token or secrets.token_urlsafe(24)
        (workdir / "token").write_text(self.token, encoding="utf-8")
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SAMSegmentLib.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--port-file", str(port_file), "--token-file", str(self.workdir / "token"), "--runtime", self.runtime],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "server.log", "ab"), env=env)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            assert self.process.poll() is None, (self.workdir / "server.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
