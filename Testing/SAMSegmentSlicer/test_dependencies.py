"""Which Slicer SAMSegment runs in, and (slow) a real pip resolve of the local server's environment:
Resources/requirements.txt with PyTorch for the Python that Slicer 5.10 ships (the environment is
made from it). Nothing is installed into Slicer's own Python any more (see local_server.py)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from SAMSegmentSlicer import dependencies as deps
from SAMSegmentSlicer.local_server import REQUIREMENTS_FILE, TORCH_REQUIREMENTS


# ---------------------------------------------------------------- supported Slicer and Python
@pytest.mark.parametrize("slicer_version, python_version", [((5, 10), (3, 12)), ((5, 12), (3, 12)), ((6, 0), (3, 13))])
def test_supported_versions(slicer_version, python_version):
    assert deps.check_supported(slicer_version, python_version) is None


def test_slicer_5_8_is_refused_with_the_remedy():
    message = deps.check_supported((5, 8), (3, 9))
    assert "3D Slicer 5.10 or later (this is 5.8)" in message and "download.slicer.org" in message


def test_an_old_python_is_refused_even_in_a_new_slicer():
    message = deps.check_supported((5, 10), (3, 9))  # e.g. a custom build against an old system Python
    assert "Python 3.10 or later" in message and "3.9" in message and "Slicer 5.10 or later" in message


def test_minimums_are_module_constants():
    assert deps.MIN_SLICER_VERSION == (5, 10) and deps.MIN_PYTHON == (3, 10)
    assert deps.check_supported((5, 9), (3, 12)) is not None and deps.check_supported((5, 10), (3, 10)) is None


# ---------------------------------------------------------------- the server environment's resolve
SLICER_5_10_PYTHON = "3.12"  # Slicer 5.10 CMakeLists.txt: Slicer_REQUIRED_PYTHON_VERSION "3.12.10"
# Linux x86_64 wheels; pip does not expand PEP 600 tags itself. torch 2.14 wheels need glibc 2.28.
LINUX_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64"]


def index_unreachable(pip_output: str) -> str | None:
    """Why pip's package index cannot be reached, or None when it answers (then a failure is a real one).

    Probed after a failed resolve because offline pip reports missing candidates as "ResolutionImpossible",
    the same words as a true conflict. The index is the first one pip names ("Looking in indexes: ..."), PyPI
    when it names none; any HTTP answer, even 404, means it is reachable.
    """
    named = next((line for line in pip_output.splitlines() if line.startswith("Looking in indexes:")), "")
    url = named.partition(":")[2].split(",")[0].strip() or "https://pypi.org/simple"
    try:
        urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=15).close()
    except urllib.error.HTTPError:
        return None
    except OSError as exc:
        return f"{url}: {exc}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="pip evaluates environment markers on the machine it runs on, so this Linux resolve is "
                           "only faithful on Linux x86_64")
def test_server_environment_resolves_for_slicers_python(tmp_path):
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--target", str(tmp_path / "t"), "--report", str(report), "--disable-pip-version-check",
               "--retries", "1", "--timeout", "30", "--python-version", SLICER_5_10_PYTHON, "--only-binary=:all:",
               *(arg for tag in LINUX_PLATFORMS for arg in ("--platform", tag)),
               "-r", str(REQUIREMENTS_FILE), *TORCH_REQUIREMENTS]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    output = done.stdout + done.stderr
    unreachable = index_unreachable(output) if done.returncode != 0 else None
    if unreachable:
        pytest.skip(f"the package index cannot be reached ({unreachable})")
    assert done.returncode == 0, output[-6000:]
    planned = {item["metadata"]["name"].lower().replace("_", "-")
               for item in json.loads(report.read_text(encoding="utf-8"))["install"]}
    wanted = [line.split("#")[0].strip() for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()]
    names = {req.split(";")[0].replace(" ", "") for req in wanted if req}
    names = {n.split(">")[0].split("=")[0].split("<")[0].split("[")[0].lower().replace("_", "-") for n in names}
    assert names | {"torch", "torchvision"} <= planned, (names | {"torch", "torchvision"}) - planned
