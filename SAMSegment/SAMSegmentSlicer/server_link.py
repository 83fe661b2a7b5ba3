"""Where the module's engine runs: the local server Slicer starts for itself, or a remote one.

Both answer ``poll()`` with ``(state, url, token)`` without blocking: state is "ready", "starting"
or "failed" (then ``error`` says why). The local one is started on the first ``poll()``, restarted
when it dies (``LocalServer.ensure_running``: a bounded number of times), and one instance is
shared by the module and the SAM effect (``shared_local_server``). The remote one is a URL and an
API key, which Slicer keeps in its application settings (``REMOTE_URL_KEY``/``REMOTE_TOKEN_KEY``),
never in the scene.
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any, Callable, Sequence

from SAMSegmentLib.errors import SAMSegmentError

from .local_server import CommandRun, LocalServer, env_python, setup_commands

# QSettings keys (slicer.app.userSettings()) of the remote server option
MODE_KEY = "SAMSegment/Server"            # "local" (default) or "remote"
REMOTE_URL_KEY = "SAMSegment/ServerURL"
REMOTE_TOKEN_KEY = "SAMSegment/ServerAPIKey"
LIB_DIR = Path(__file__).resolve().parents[1]   # the folder holding SAMSegmentLib


class RemoteServer:
    """A server someone else runs (a GPU box, a Ray cluster): always "ready"; the client reports
    whether it answers."""

    restartable = False

    def __init__(self, url: str, token: str | None) -> None:
        if not url.startswith(("http://", "https://")):
            raise SAMSegmentError(f"The server URL {url!r} is not an http(s) URL",
                                  "give e.g. https://gpu-box.hospital.org:8765")
        self.url, self.token, self.error = url.rstrip("/"), token or None, None

    def poll(self) -> tuple[str, str | None, str | None]:
        return "ready", self.url, self.token

    def describe(self) -> str:
        return f"remote server {self.url}"

    def stop(self) -> None:
        pass  # not ours to stop


class LocalServerLink:
    """``samsegment serve`` on 127.0.0.1 in its own Python environment, started on demand.

    Args:
        env_dir: the server's virtual environment (created by ``setup()`` with the user's consent).
        log_file: where the environment setup and the server write their output.
        extra_args: more ``samsegment serve`` options (``--device cuda``, ``--checkpoint ...``).
        python: the interpreter to run the server with, when it is not ``env_dir``'s (tests).
    """

    restartable = True

    def __init__(self, env_dir: str | Path, log_file: str | Path, extra_args: Sequence[str] = (),
                 python: str | Path | None = None) -> None:
        self.env_dir, self.log_file = Path(env_dir), Path(log_file)
        self.python = Path(python) if python is not None else env_python(self.env_dir)
        self.extra_args = list(extra_args)
        self.server: LocalServer | None = None
        self.setup_run: CommandRun | None = None
        self.error: str | None = None

    @property
    def installed(self) -> bool:
        return self.python.exists()

    def setup(self, base_python: str | Path) -> CommandRun:
        """Start creating the environment (venv + packages; minutes, downloads PyTorch); poll it."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.setup_run = CommandRun(setup_commands(base_python, self.env_dir), self.log_file)
        return self.setup_run

    def configure(self, extra_args: Sequence[str]) -> None:
        """New server options (device, checkpoints): the running server is restarted with them."""
        if list(extra_args) != self.extra_args:
            self.extra_args = list(extra_args)
            if self.server is not None:
                self.server.stop()
                self.server = None

    def poll(self) -> tuple[str, str | None, str | None]:
        if self.setup_run is not None:
            if not self.setup_run.poll():
                return "starting", None, None
            run, self.setup_run = self.setup_run, None
            if run.error is not None:
                self.error = f"Setting up the server environment failed: {run.error}"
                return "failed", None, None
        if not self.installed:
            self.error = f"The SAMSegment server environment {self.env_dir} is not set up"
            return "failed", None, None
        try:
            if self.server is None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                self.server = LocalServer(self.python, LIB_DIR, self.log_file, self.extra_args)
                _running.append(self.server)
            state = self.server.ensure_running()
        except SAMSegmentError as exc:
            self.error = str(exc)
            return "failed", None, None
        self.error = None
        if state == "ready":
            return "ready", self.server.url, self.server.token
        return "starting", None, None

    def describe(self) -> str:
        url = self.server.url if self.server is not None else None
        return f"local server {url}" if url else "local server (starting)"

    def stop(self) -> None:
        if self.setup_run is not None:
            self.setup_run.cancel()
        if self.server is not None:
            self.server.stop()
            self.server = None


_running: list[LocalServer] = []
_shared: dict[str, LocalServerLink] = {}


def shared_local_server(env_dir: str | Path, log_file: str | Path,
                        factory: Callable[..., LocalServerLink] = LocalServerLink) -> LocalServerLink:
    """The one local server of this Slicer session (the module and the effect use the same)."""
    key = str(Path(env_dir).resolve())
    if key not in _shared:
        _shared[key] = factory(env_dir, log_file)
    return _shared[key]


def stop_local_servers() -> None:
    """Stop every local server this process started (Slicer's aboutToQuit, and atexit)."""
    while _running:
        _running.pop().stop()
    _shared.clear()


atexit.register(stop_local_servers)


def local_paths(settings_file: str | Path) -> tuple[Path, Path]:
    """(environment folder, log file) of the local server, beside Slicer's per-user settings file
    (``slicer.app.slicerUserSettingsFilePath``): per user, kept across Slicer versions' reinstalls."""
    base = Path(settings_file).resolve().parent / "SAMSegment"
    return base / "server-env", base / "server.log"


def server_args(device: str = "auto", model: str | None = None, checkpoint: str | None = None) -> list[str]:
    """``samsegment serve`` options for the module's Device, Model and Checkpoint settings (the
    server loads ``model`` from the user's ``checkpoint`` file)."""
    args = [] if device in ("", "auto") else ["--device", device]
    if checkpoint:
        args += (["--model", model] if model else []) + ["--checkpoint", checkpoint]
    return args


def link_from_settings(settings: Any, env_dir: str | Path, log_file: str | Path) -> Any:
    """The link the user chose in the module's Server section (``settings``: a QSettings)."""
    if str(settings.value(MODE_KEY, "local")) == "remote":
        return RemoteServer(str(settings.value(REMOTE_URL_KEY, "")), str(settings.value(REMOTE_TOKEN_KEY, "")))
    return shared_local_server(env_dir, log_file)
