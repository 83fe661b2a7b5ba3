"""The module's local server: its own environment, a real ``samsegment serve`` child on 127.0.0.1,
restarted when it dies, stopped at the end. The interpreter running these tests stands in for the
server environment's (it has the server's packages); the commands that would create that
environment are checked, not run (they download PyTorch)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from SAMSegmentSlicer.local_server import CommandRun, LocalServer, env_python, setup_commands

ROOT = Path(__file__).resolve().parents[2]


def wait_ready(server: LocalServer, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    state = server.poll()
    while state != "ready" and time.monotonic() < deadline:
        assert state != "dead", server.log_file.read_text(errors="replace")
        time.sleep(0.1)
        state = server.poll()
    return state


def test_environment_commands_never_install_into_slicers_python(tmp_path):
    slicer_python = "/opt/Slicer/bin/PythonSlicer"
    env = tmp_path / "server-env"
    commands = setup_commands(slicer_python, env, cuda=False)
    assert commands[0] == [slicer_python, "-m", "venv", str(env)]
    for command in commands[1:]:
        assert command[0] == str(env_python(env)) and command[1:4] == ["-m", "pip", "install"]
    torch = next(c for c in commands if any(arg.startswith("torch>=") for arg in c))
    assert "--index-url" in torch if sys.platform != "darwin" else True  # CPU build without an NVIDIA GPU
    assert "--index-url" not in setup_commands(slicer_python, env, cuda=True)[2]


def test_command_run_advances_without_waiting_and_reports_failure(tmp_path):
    ok = CommandRun([[sys.executable, "-c", "print('one')"], [sys.executable, "-c", "print('two')"]],
                    tmp_path / "log.txt")
    t0 = time.monotonic()
    polls = 0
    while not ok.poll():
        polls += 1
        time.sleep(0.02)
        assert time.monotonic() - t0 < 60
    assert ok.error is None and polls >= 2 and "two" in (tmp_path / "log.txt").read_text()
    bad = CommandRun([[sys.executable, "-c", "raise SystemExit(3)"]], tmp_path / "bad.txt")
    while not bad.poll():
        time.sleep(0.02)
    assert "exit code 3" in bad.error


@pytest.mark.slow  # a real `samsegment serve` subprocess that loads the model, twice
def test_server_starts_restarts_after_dying_and_stops(tmp_path):
    from SAMSegmentLib.client import RemoteSession

    server = LocalServer(sys.executable, ROOT, tmp_path / "server.log")
    try:
        t0 = time.monotonic()
        server.start()
        assert time.monotonic() - t0 < 0.5  # start() does not wait for the server
        assert wait_ready(server) == "ready" and server.url.startswith("http://127.0.0.1:")
        token_file = Path(server._private) / "token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        client = RemoteSession(server.url, server.token, timeout=30)
        assert client.info["auth"] and client.info["api_version"] == 1
        server._process.kill()
        server._process.wait(10)
        assert server.poll() == "dead"
        assert server.ensure_running() in ("starting", "ready")
        assert wait_ready(server) == "ready"
        assert RemoteSession(server.url, server.token, timeout=30).info["api_version"] == 1
        assert server.port is not None
    finally:
        process = server._process
        server.stop()
    assert process.poll() is not None and not Path(server._private).exists()
    assert server.poll() == "stopped"


def test_missing_environment_is_a_clear_error(tmp_path):
    from SAMSegmentLib.errors import SAMSegmentError

    server = LocalServer(tmp_path / "no-env" / "bin" / "python", ROOT, tmp_path / "log")
    with pytest.raises(SAMSegmentError, match="set up the SAMSegment server environment"):
        server.start()
    server.stop()


def test_module_settings_become_server_options(tmp_path):
    """The panel's Device, Model and Checkpoint reach the local server as ``samsegment serve``
    options (test_server.py checks that the server loads the model from that file); a change
    restarts the server with them."""
    from SAMSegmentSlicer.server_link import LocalServerLink, local_paths, server_args

    assert server_args("cuda", "sam_vit_b", "/data/sam_vit_b_01ec64.pth") == [
        "--device", "cuda", "--model", "sam_vit_b", "--checkpoint", "/data/sam_vit_b_01ec64.pth"]
    assert server_args("auto", "litemedsam", None) == []
    env, log = local_paths(tmp_path / "Slicer.ini")
    assert env == tmp_path / "SAMSegment" / "server-env" and log.parent == env.parent
    link = LocalServerLink(env, log)
    assert not link.installed and link.poll()[0] == "failed" and "not set up" in link.error
    link.configure(["--device", "cpu"])
    assert link.extra_args == ["--device", "cpu"]
