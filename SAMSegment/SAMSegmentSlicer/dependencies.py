"""Which Python packages SAMSegment still needs in this Slicer, and installing them with consent.

Nothing is installed at import time or without the user saying yes. torch comes from the PyTorch
extension's installer (it picks the CUDA/CPU build that matches the machine, which a plain pip
resolve would get wrong); everything else comes from ``Resources/requirements.txt``. The decisions
here are plain functions over injected callables, so they are tested without Slicer's GUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = "torch>=2.1"
TORCHVISION_REQUIREMENT = "torchvision>=0.16"


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


def ensure(confirm: Callable[[str], bool], install_torch: Callable[[], object] | None,
           pip_install: Callable[[str], object], version_of: Callable[[str], str | None] = installed_version) -> bool:
    """Install what is missing after ``confirm(message)`` says yes; True when all is present.

    ``install_torch`` is the PyTorch extension's installer or None when that extension is absent.
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
            pip_install(" ".join(f'"{r.spec}"' if any(c in r.spec for c in "<>=") else r.spec for r in todo.packages))
    except DependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - pip/network errors become one clear message
        raise DependencyError(f"Installing Python packages failed ({exc.__class__.__name__}: {exc}). "
                              "Without internet access install them from a wheel folder with "
                              f"slicer.util.pip_install('--no-index --find-links <folder> -r {REQUIREMENTS_FILE}').") from exc
    missing = plan(version_of)
    if not missing.nothing_to_do:
        raise DependencyError("Some packages are still missing after installing: "
                              + ", ".join(r.name for r in missing.packages) + ("" if not missing.torch_missing else " torch")
                              + ". Restart Slicer and try again.")
    return True
