"""``samsegment propagate --adapt / --adapter / --save-adapter`` (issue 16).

Option errors come before the image is segmented and before the model loads (``no_model``), with
the project's error and remedy and nothing written. The slow tests adapt on the crop of the sample
CT (slices 20..24, the spleen accepted on three of them) with small forced settings, in-process and
on a server. The adapter key lives in a temporary folder (``$SAMSEGMENT_ADAPTER_KEY``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMSegmentLib import cli, sample_data
from SAMSegmentLib.adaptation import KEY_ENV, AdaptSettings, DecoderAdapter
from SAMSegmentLib.cli import main

BOX = ["10", "22", "39", "51"]  # the spleen on slice 2 of the crop
KEPT = AdaptSettings(check_steps=2, final_steps=1, learning_rate=1e-3, min_gain=-1.0,
                      mirror_min_gain=-1.0)  # kept whatever the check says
NEVER = AdaptSettings(check_steps=1, final_steps=1, min_gain=1.0, mirror_min_gain=1.0)  # a Dice gain above 1: never kept


@pytest.fixture(autouse=True)
def key_file(tmp_path_factory, monkeypatch):
    """An adapter key of this test in a temporary folder, made on first use."""
    path = tmp_path_factory.mktemp("adapter-key") / "adapter-signing.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def anchor(crop, tmp_path_factory):
    """The spleen accepted on slices 1, 2 and 3 of the crop, as a mask file on its grid."""
    image = sitk.ReadImage(crop)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))[20:25]
    mask = (labels == sample_data.label_values()["spleen"]).astype(np.uint8)
    mask[[0, 4]] = 0
    written = sitk.GetImageFromArray(mask)
    written.CopyInformation(image)
    path = tmp_path_factory.mktemp("anchor") / "accepted.nii.gz"
    sitk.WriteImage(written, str(path))
    return str(path)


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def a_signed_adapter(path: Path, key: bytes, model_id: str = "litemedsam") -> Path:
    """A (tiny, never decoded) adapter file signed with ``key``."""
    adapter = DecoderAdapter(model_id, "0" * 64, {"mask_tokens.weight": np.zeros((4, 256), np.float32)})
    path.write_bytes(adapter.to_bytes(key))
    return path


# (command line after "propagate {img}", with {out} for the test's folder; a piece of the message)
PROMPTS = ["--slice", "2", "--box", *BOX, "--out", "{out}/m.nii.gz"]
ANCHORED = ["--anchor-mask", "{anchor}", "--out", "{out}/m.nii.gz"]
BAD_OPTIONS = [
    ("adapt-without-anchors", PROMPTS + ["--adapt"], "--anchor-mask"),
    ("adapt-and-adapter", ANCHORED + ["--adapt", "--adapter", "{out}/x.samadapter"], "not both"),
    ("save-without-adapt", ANCHORED + ["--save-adapter", "{out}/a.samadapter"], "add --adapt"),
    ("save-to-a-folder", ANCHORED + ["--adapt", "--save-adapter", "{out}"], "is a folder"),
    ("save-to-a-missing-folder", ANCHORED + ["--adapt", "--save-adapter", "{out}/nowhere/a.samadapter"],
     "does not exist"),
    ("save-onto-the-image", ANCHORED + ["--adapt", "--save-adapter", "{img}", "--overwrite"],
     "Refusing to write onto the input"),
    ("save-onto-the-anchor", ANCHORED + ["--adapt", "--save-adapter", "{anchor}", "--overwrite"],
     "Refusing to write onto the input"),
    ("save-onto-out", ANCHORED + ["--adapt", "--save-adapter", "{out}/m.nii.gz"], "name the same file"),
    ("save-existing", ANCHORED + ["--adapt", "--save-adapter", "{out}/notes.txt"], "already exists"),
    ("save-replaces-a-non-adapter", ANCHORED + ["--adapt", "--save-adapter", "{out}/notes.txt", "--overwrite"],
     "is not an adapter file"),
    ("adapter-missing", ANCHORED + ["--adapter", "{out}/missing.samadapter"], "not found"),
    ("adapter-not-an-adapter", ANCHORED + ["--adapter", "{out}/notes.txt"], "is not a SAMSegment adapter file"),
    ("adapter-foreign-key", ANCHORED + ["--adapter", "{out}/foreign.samadapter"], "not signed with this machine"),
    ("adapter-other-model", ANCHORED + ["--adapter", "{out}/sam.samadapter"], "trained for model 'sam_vit_b'"),
    ("adapter-not-an-adapter-server", ANCHORED + ["--adapter", "{out}/notes.txt", "--server", "http://127.0.0.1:9"],
     "is not a SAMSegment adapter file"),
]


@pytest.mark.parametrize("case,argv,message", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_adaptation_options_are_refused_before_the_model_loads(case, argv, message, crop, anchor, key_file,
                                                                   tmp_path, capsys, no_model):
    from SAMSegmentLib.adaptation import signing_key

    (tmp_path / "notes.txt").write_text("not an adapter")
    a_signed_adapter(tmp_path / "foreign.samadapter", b"f" * 32)
    a_signed_adapter(tmp_path / "sam.samadapter", signing_key(), model_id="sam_vit_b")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    argv = ["propagate", crop] + [a.format(img=crop, out=tmp_path, anchor=anchor) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert message in err and "what to do:" in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written


def test_the_help_names_the_adaptation_options(capsys):
    with pytest.raises(SystemExit):
        main(["propagate", "--help"])
    out = capsys.readouterr().out
    assert "adaptation:" in out and "--adapt" in out and "--adapter FILE" in out and "--save-adapter FILE" in out


@pytest.mark.slow
def test_adapt_saves_an_adapter_that_adapter_then_uses(crop, anchor, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_adapt_settings", lambda args: KEPT)
    saved = tmp_path / "spleen.samadapter"
    code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapt", "--save-adapter", saved,
                          "--out", tmp_path / "adapted.nii.gz"], capsys)
    assert code == 0, err
    assert "Adaptation kept: Dice on held-back slice 2" in out and f"Adapter written: {saved}" in out
    assert "with the adapted decoder" in out
    adapter = DecoderAdapter.load(saved)  # signed with this machine's key, for this model
    assert adapter.model_id == "litemedsam" and adapter.report["kept"] and adapter.report["slices"] == [1, 2, 3]

    code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapter", saved,
                          "--out", tmp_path / "reused.nii.gz"], capsys)
    assert code == 0, err
    assert f"Adapter loaded: {saved}" in out and "with the adapted decoder" in out
    assert np.array_equal(read(tmp_path / "reused.nii.gz"), read(tmp_path / "adapted.nii.gz"))

    code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapt", "--save-adapter", saved,
                          "--out", tmp_path / "again.nii.gz"], capsys)
    assert code == 2 and "already exists" in err  # an adapter is replaced only with --overwrite


@pytest.mark.slow
def test_an_adaptation_that_is_not_kept_writes_no_adapter(crop, anchor, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_adapt_settings", lambda args: NEVER)
    saved = tmp_path / "spleen.samadapter"
    code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapt", "--save-adapter", saved,
                          "--out", tmp_path / "m.nii.gz"], capsys)
    assert code == 0, err
    assert "Adaptation not kept" in out and "no adapter was written" in out and "with the stock model" in out
    assert not saved.exists() and (tmp_path / "m.nii.gz").is_file()


@pytest.mark.slow
def test_adapt_and_adapter_work_on_a_server(backend, crop, anchor, tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    from SAMSegmentLib.server.serve import ServerHandle
    from SAMSegmentLib.server.state import ServerState

    from SAMSegmentLib.client import RemoteSession

    monkeypatch.setattr(cli, "_adapt_settings", lambda args: KEPT)
    # --save-adapter writes the signed file the client fetched when the adapter was kept: no second download
    monkeypatch.setattr(RemoteSession, "adapter_file_bytes", lambda self: pytest.fail("the adapter was downloaded twice"))
    token = "test-token-cli-adaptation-0123"
    (tmp_path / "token").write_text(token)
    with ServerHandle(ServerState(backends=(backend,)), token) as server:
        remote = ["--server", server.url, "--token-file", tmp_path / "token"]
        saved = tmp_path / "remote.samadapter"
        code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapt", "--save-adapter", saved,
                              "--out", tmp_path / "remote.nii.gz", *remote], capsys)
        assert code == 0, err
        assert "Adaptation kept" in out and f"Adapter written: {saved}" in out
        assert DecoderAdapter.load(saved).report["kept"]  # the server's key: this test's, shared
        code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapter", saved,
                              "--out", tmp_path / "remote_reused.nii.gz", *remote], capsys)
        assert code == 0, err
        assert f"Adapter loaded: {saved}" in out
        foreign = a_signed_adapter(tmp_path / "foreign.samadapter", b"f" * 32)
        code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapter", foreign,
                              "--out", tmp_path / "never.nii.gz", *remote], capsys)
        assert code == 2 and "not signed" in err and not (tmp_path / "never.nii.gz").exists()
    assert np.array_equal(read(tmp_path / "remote_reused.nii.gz"), read(tmp_path / "remote.nii.gz"))
    code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapt", "--out", tmp_path / "local.nii.gz"],
                         capsys)
    assert code == 0, err
    assert np.array_equal(read(tmp_path / "local.nii.gz"), read(tmp_path / "remote.nii.gz"))  # the same engine


class _Interrupted:
    """A session whose adaptation sees Ctrl-C: the token is set, then the engine stops (raises) or
    had just finished its last step (returns a report)."""

    def __init__(self, finishes: bool) -> None:
        self.finishes, self.cancel = finishes, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def set_volume(self, volume, window=None, modality="auto"):
        return window

    def adapt(self, axis, accepted, structure=None, settings=None, cancel=None, progress=None):
        from SAMSegmentLib.adaptation import AdaptationReport
        from SAMSegmentLib.errors import CancelledError

        self.cancel = cancel
        progress(1, 18, "training: step 1 of 18")
        cancel.cancel()  # what the first Ctrl-C does
        if not self.finishes:
            raise CancelledError("The adaptation was cancelled")
        return AdaptationReport(True, axis, tuple(sorted(accepted)), "slice 2", 0.9, 0.95, 18, 1.0, 0.05, 6)


@pytest.mark.parametrize("finishes", [False, True], ids=["stopped", "finished-as-ctrl-c-came"])
def test_ctrl_c_during_the_adaptation_exits_130_and_writes_nothing(finishes, crop, anchor, tmp_path, capsys,
                                                                   monkeypatch):
    fake = _Interrupted(finishes)
    monkeypatch.setattr(cli, "_session", lambda args: fake)
    code, out, err = run(["propagate", crop, "--anchor-mask", anchor, "--adapt", "--save-adapter",
                          tmp_path / "a.samadapter", "--out", tmp_path / "m.nii.gz"], capsys)
    assert code == 130 and fake.cancel.cancelled
    assert "interrupted during the adaptation; nothing was written" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("content, message", [(None, "is not a file"), (b"short", "at least 32")])
def test_serve_refuses_an_adapter_key_that_cannot_sign(content, message, tmp_path, capsys, no_model, monkeypatch):
    """``serve --adapter-key FILE``: checked before the server starts (nothing listens, no model loads)."""
    monkeypatch.delenv("SAMSEGMENT_ADAPTER_KEY", raising=False)
    key = tmp_path / "site.key"
    if content is not None:
        key.write_bytes(content)
    code, _, err = run(["serve", "--port", "0", "--adapter-key", key], capsys)
    assert code == 2 and message in err and "what to do:" in err
    assert "SAMSEGMENT_ADAPTER_KEY" not in os.environ
