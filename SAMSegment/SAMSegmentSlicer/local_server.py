"""The local SAMSegment server that the Slicer module starts for itself, in its own Python environment.

Why a separate process and environment: inside Slicer, Python worker threads only advance while
main-thread Python runs (PythonQt never releases the GIL while Qt idles), so the model cannot run
in Slicer's process at interactive speed; and installing torch, ONNX Runtime and OpenCV into
Slicer's own Python can change packages Slicer ships. So the engine runs as ``samsegment serve``
on 127.0.0.1 (a free port, a random token) in a virtual environment of its own, created from
Slicer's Python (which ships ``venv``), into which the packages are installed with the user's
consent. Nothing here blocks: every step is a subprocess that ``poll()`` advances from the
module's timer.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from SAMSegmentLib.errors import SAMSegmentError

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
SERVER_REQUIREMENTS = ("fastapi>=0.100", "uvicorn>=0.23")
TORCH_REQUIREMENTS = ("torch>=2.1", "torchvision>=0.16")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# A server that dies this many times within RESTART_WINDOW_S is not restarted again.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 120.0


def env_python(env_dir: Path) -> Path:
    """The interpreter of the virtual environment ``env_dir``."""
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    """Whether an NVIDIA driver is installed (then the default torch wheel, with CUDA, is the right one)."""
    return shutil.which("nvidia-smi") is not None


def setup_commands(base_python: str | Path, env_dir: Path, cuda: bool | None = None,
                   requirements: Path = REQUIREMENTS_FILE) -> list[list[str]]:
    """The commands that create the server's environment and install its packages into it.

    Everything after the first command runs the environment's own interpreter, so nothing is
    installed into ``base_python``'s (Slicer's) site-packages. Without an NVIDIA GPU, torch comes
    from PyTorch's CPU index (a plain install would download the multi-GB CUDA build).
    """
    python = str(env_python(env_dir))
    cuda = has_nvidia_gpu() if cuda is None else cuda
    torch = [python, "-m", "pip", "install", "--disable-pip-version-check", *TORCH_REQUIREMENTS]
    if not cuda and sys.platform != "darwin":
        torch += ["--index-url", CPU_TORCH_INDEX]
    return [[str(base_python), "-m", "venv", str(env_dir)],
            [python, "-m", "pip", "install", "--disable-pip-version-check", "--upgrade", "pip"],
            torch,
            [python, "-m", "pip", "install", "--disable-pip-version-check", "-r", str(requirements),
             *SERVER_REQUIREMENTS]]


@dataclass
class CommandRun:
    """Commands run one after the other as subprocesses, advanced by ``poll()`` (never waits)."""

    commands: Sequence[Sequence[str]]
    log_file: Path
    popen: Callable[..., subprocess.Popen] = subprocess.Popen
    step: int = 0
    error: str | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def poll(self) -> bool:
        """Start or check the current command; True once all finished (or one failed: ``error``)."""
        if self.error is not None or self.step >= len(self.commands):
            return True
        if self._process is None:
            with open(self.log_file, "ab") as log:
                self._process = self.popen(list(self.commands[self.step]), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)
            return False
        code = self._process.poll()
        if code is None:
            return False
        if code != 0:
            self.error = (f"'{' '.join(self.commands[self.step][:4])} ...' failed (exit code {code}); "
                          f"see {self.log_file}")
            return True
        self.step, self._process = self.step + 1, None
        return self.poll()

    def cancel(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
        self.error = self.error or "cancelled"


class LocalServer:
    """``samsegment serve`` on 127.0.0.1 in a child process, restarted when it dies.

    Args:
        python: the interpreter that runs the server (the environment's, see ``env_python``).
        lib_dir: the folder that holds ``SAMSegmentLib`` (put on the server's PYTHONPATH).
        log_file: where the server's output goes (shown to the user when it fails).
        extra_args: more ``samsegment serve`` options (e.g. ``--device cpu``).
    """

    def __init__(self, python: str | Path, lib_dir: str | Path, log_file: str | Path,
                 extra_args: Sequence[str] = (), popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> None:
        self.python, self.lib_dir, self.log_file = Path(python), Path(lib_dir), Path(log_file)
        self.extra_args = list(extra_args)
        self.popen = popen
        self._private = Path(tempfile.mkdtemp(prefix="samsegment-server-"))  # 0700: token and port live here
        self.token = secrets.token_urlsafe(32)
        token_file = self._private / "token"
        token_file.write_text(self.token, encoding="utf-8")
        os.chmod(token_file, 0o600)
        self._process: subprocess.Popen | None = None
        self._deaths: list[float] = []
        self.port: int | None = None

    @property
    def port_file(self) -> Path:
        return self._private / "port"

    @property
    def url(self) -> str | None:
        return None if self.port is None else f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server process (returns at once; ``poll()`` tells when it listens)."""
        if not self.python.exists():
            raise SAMSegmentError(f"The server's Python {self.python} does not exist",
                                  "set up the SAMSegment server environment first (the module offers it)")
        self.port = None
        self.port_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.lib_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop("PYTHONHOME", None)  # Slicer's; the environment has its own
        command = [str(self.python), "-m", "SAMSegmentLib.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--port-file", str(self.port_file), "--token-file", str(self._private / "token"),
                   *self.extra_args]
        with open(self.log_file, "ab") as log:
            self._process = self.popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env)

    def poll(self) -> str:
        """"ready" (listening: ``url`` and ``token`` are set), "starting", "stopped" or "dead"."""
        if self._process is None:
            return "stopped"
        if self._process.poll() is not None:
            self.port = None
            return "dead"
        if self.port is None and self.port_file.exists():
            text = self.port_file.read_text(encoding="utf-8").strip()
            self.port = int(text) if text.isdigit() else None
        return "ready" if self.port is not None else "starting"

    def ensure_running(self) -> str:
        """Restart a dead server (at most MAX_RESTARTS times in RESTART_WINDOW_S); returns ``poll()``'s state."""
        state = self.poll()
        if state in ("ready", "starting"):
            return state
        now = time.monotonic()
        if state == "dead":
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(self._deaths) > MAX_RESTARTS:
                raise SAMSegmentError(f"The SAMSegment server stopped {len(self._deaths)} times in "
                                      f"{RESTART_WINDOW_S:.0f} s", f"see its log, {self.log_file}")
        self.start()
        return self.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (terminate, then kill after ``timeout``) and remove its token."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self.port = None
        shutil.rmtree(self._private, ignore_errors=True)
