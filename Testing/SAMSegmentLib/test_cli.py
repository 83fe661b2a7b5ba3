"""The samsegment command line, end to end on the bundled sample CT with the real model."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import SimpleITK as sitk

from SAMSegmentLib import sample_data
from SAMSegmentLib.cli import main

IMAGE = str(sample_data.path(sample_data.IMAGE))


@pytest.fixture(scope="module")
def spleen_box():
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))
    spleen = lab == sample_data.label_values()["spleen"]
    k = int(spleen.sum(axis=(1, 2)).argmax())
    ys, xs = np.nonzero(spleen[k])
    return k, [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], spleen


@pytest.mark.slow  # CLI runs on the sample CT, a new backend each
def test_segment_writes_one_slice_with_image_geometry(tmp_path, spleen_box, capsys):
    k, box, spleen = spleen_box
    out = tmp_path / "slice.nii.gz"
    assert main(["segment", IMAGE, "--slice", str(k), "--box", *map(str, box), "--out", str(out),
                 "--png", str(tmp_path / "slice.png")]) == 0
    mask_img = sitk.ReadImage(str(out))
    src = sitk.ReadImage(IMAGE)
    assert mask_img.GetSize() == src.GetSize()
    assert np.allclose(mask_img.GetDirection(), src.GetDirection())
    assert np.allclose(mask_img.GetOrigin(), src.GetOrigin()) and np.allclose(mask_img.GetSpacing(), src.GetSpacing())
    mask = sitk.GetArrayFromImage(mask_img) > 0
    assert mask[k].any() and not np.delete(mask, k, axis=0).any()
    d = 2 * (mask[k] & spleen[k]).sum() / (mask[k].sum() + spleen[k].sum())
    assert d > 0.85
    assert (tmp_path / "slice.png").stat().st_size > 1000
    assert "model score" in capsys.readouterr().out


@pytest.mark.slow  # CLI runs on the sample CT, a new backend each
def test_box_margin_option(tmp_path, spleen_box, capsys):
    """The tight reference box: with LiteMedSAM's default margin the spleen comes out fuller than
    with --box-margin 0 (the box as given); a margin that is not a fraction is refused."""
    k, box, spleen = spleen_box
    common = ["segment", IMAGE, "--slice", str(k), "--box", *map(str, box)]
    assert main(common + ["--out", str(tmp_path / "default.nii.gz")]) == 0
    assert main(common + ["--box-margin", "0", "--out", str(tmp_path / "drawn.nii.gz")]) == 0
    default, drawn = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f)))[k] > 0
                      for f in ("default.nii.gz", "drawn.nii.gz"))
    dice = [2 * (m & spleen[k]).sum() / (m.sum() + spleen[k].sum()) for m in (default, drawn)]
    assert default.sum() > drawn.sum() and dice[0] > dice[1]
    capsys.readouterr()
    assert main(common + ["--box-margin", "10", "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "Box margin" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()


@pytest.mark.slow  # CLI runs on the sample CT, a new backend each
def test_lps_prompts_give_the_same_mask_as_voxel_prompts(tmp_path, spleen_box):
    k, box, _ = spleen_box
    src = sitk.ReadImage(IMAGE)  # direction diag(-1, -1, 1): LPS and index axes differ in sign
    c0 = src.TransformContinuousIndexToPhysicalPoint((float(box[0]), float(box[1]), float(k)))
    c1 = src.TransformContinuousIndexToPhysicalPoint((float(box[2]), float(box[3]), float(k)))
    out_v, out_p = tmp_path / "v.nii.gz", tmp_path / "p.nii.gz"
    assert main(["segment", IMAGE, "--slice", str(k), "--box", *map(str, box), "--out", str(out_v)]) == 0
    assert main(["segment", IMAGE, "--coords", "lps", "--box", *map(str, c0 + c1), "--out", str(out_p)]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out_v)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out_p)))
    assert a.any() and np.array_equal(a, b)


@pytest.mark.slow  # a full propagation on the sample CT, with a new backend
def test_propagate_and_refuse_overwrite(tmp_path, spleen_box, capsys):
    k, box, spleen = spleen_box
    out = tmp_path / "spleen.nrrd"
    args = ["propagate", IMAGE, "--slice", str(k), "--box", *map(str, box), "--out", str(out),
            "--png", str(tmp_path / "spleen.png"), "--max-slices", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "range limit reached" in text
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
    assert sorted(np.nonzero(mask.any(axis=(1, 2)))[0].tolist()) == list(range(k - 4, min(k + 5, mask.shape[0])))
    before = out.read_bytes()
    assert main(args) == 2  # exists: refused, untouched
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.slow  # CLI runs on the sample CT, a new backend each
def test_output_onto_the_input_is_refused(tmp_path, spleen_box, capsys):
    k, box, _ = spleen_box
    copy = tmp_path / "ct.nii.gz"
    copy.write_bytes(open(IMAGE, "rb").read())
    before = copy.read_bytes()
    code = main(["segment", str(copy), "--slice", str(k), "--box", *map(str, box), "--out", str(copy), "--overwrite"])
    assert code == 2
    assert copy.read_bytes() == before


def test_prompt_errors_are_reported(tmp_path, spleen_box, capsys):
    k, _, _ = spleen_box
    code = main(["segment", IMAGE, "--slice", str(k), "--point", "500", "3", "--out", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "outside" in err and "what to do" in err
    code = main(["segment", IMAGE, "--slice", "999", "--box", "1", "1", "9", "9", "--out", str(tmp_path / "x.nii.gz")])
    assert code == 2 and "outside the volume" in capsys.readouterr().err
    code = main(["segment", str(tmp_path / "missing.nii.gz"), "--slice", "1", "--box", "1", "1", "9", "9",
                 "--out", str(tmp_path / "x.nii.gz")])
    assert code == 2 and "missing.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.slow  # CLI runs on the sample CT, a new backend each
def test_embed_then_reuse_cache(tmp_path, spleen_box, capsys):
    k, box, _ = spleen_box
    cache = tmp_path / "cache"
    small = tmp_path / "small.nii.gz"
    src = sitk.ReadImage(IMAGE)
    sitk.WriteImage(src[:, :, k - 1:k + 2], str(small))  # 3 slices keep the test fast
    assert main(["embed", str(small), "--cache-dir", str(cache)]) == 0
    assert len(list(cache.glob("axis0_*.pt"))) == 3
    assert "3 slice(s) encoded" in capsys.readouterr().out
    assert main(["embed", str(small), "--cache-dir", str(cache)]) == 0
    assert "0 slice(s) encoded" in capsys.readouterr().out
    # the same folder for another image is refused, with the remedy
    code = main(["embed", IMAGE, "--cache-dir", str(cache)])
    assert code == 2 and "different volume_signature" in capsys.readouterr().err


def test_models_lists_bundled_and_user_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "litemedsam (default)" in out and "bundled" in out and "sam_vit_h" in out and "--checkpoint" in out
    assert "boxes widened by 10% of their side" in out


@pytest.mark.slow  # the demo: a full propagation on the sample CT
def test_demo_returns_its_results_and_the_cli_prints_them(tmp_path, capsys, monkeypatch):
    """The library's run_demo prints nothing and does not need the CLI (the PNG montage is in io);
    the command prints the Dice from what it returns."""
    import sys

    from SAMSegmentLib import demo

    seen = {}
    run = demo.run_demo

    def spy(*args, **kwargs):
        seen["summary"] = run(*args, **kwargs)
        seen["printed"] = capsys.readouterr().out
        return seen["summary"]

    monkeypatch.setattr(demo, "run_demo", spy)
    monkeypatch.setitem(sys.modules, "SAMSegmentLib.cli", None)  # importing the CLI from here fails
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert seen["printed"] == ""
    dice = float(out.strip().splitlines()[-1].split("Dice:")[1])
    assert dice == seen["summary"]["dice"] >= 0.95
    assert f"on slice {seen['summary']['anchor_slice']}" in out
    assert (tmp_path / "spleen_mask.nii.gz").exists() and (tmp_path / "spleen_overlay.png").exists()


def _registry_file(tmp_path, **changes):
    import json

    from SAMSegmentLib.model_registry import load_registry

    entry = {k: v for k, v in vars(load_registry()["litemedsam"]).items()}
    entry.update({"id": "my_lite", "name": "My LiteMedSAM"}, **changes)
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"format": 1, "models": [entry]}), encoding="utf-8")
    return path


def test_registry_file_adds_a_model(tmp_path, capsys):
    from SAMSegmentLib import cli

    path = _registry_file(tmp_path)
    assert main(["models", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"my_lite (from {path})" in out and "litemedsam (default)\n" in out
    args = cli.build_parser().parse_args(["segment", IMAGE, "--out", str(tmp_path / "m.nii.gz"),
                                          "--registry", str(path), "--model", "my_lite", "--runtime", "eager"])
    with cli._session(args) as session:
        assert session.model_id == "my_lite" and session.backend.spec.name == "My LiteMedSAM"
    # without the file the model is unknown: exit 2 with the remedy
    assert main(["segment", IMAGE, "--slice", "1", "--box", "1", "1", "9", "9", "--out", str(tmp_path / "x.nii.gz"),
                 "--model", "my_lite"]) == 2
    assert "Unknown model 'my_lite'" in capsys.readouterr().err


def test_bad_registry_file_exits_2_naming_entry_and_field(tmp_path, capsys):
    path = _registry_file(tmp_path, interpolation="cubic")
    assert main(["models", "--registry", str(path)]) == 2
    err = capsys.readouterr().err
    assert "entry 'my_lite', field 'interpolation'" in err and "what to do: use one of: area, bilinear" in err
    path = _registry_file(tmp_path, id="litemedsam")
    assert main(["segment", IMAGE, "--slice", "1", "--box", "1", "1", "9", "9", "--out", str(tmp_path / "x.nii.gz"),
                 "--registry", str(path)]) == 2
    assert "already a packaged model" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()


def test_choices_and_presets_come_from_the_engine(monkeypatch):
    from SAMSegmentLib import cli, preprocessing, runtimes

    monkeypatch.setattr(runtimes, "RUNTIMES", runtimes.RUNTIMES + ("tensorrt",))
    monkeypatch.setitem(preprocessing.CT_PRESETS, "pelvis", (40.0, 400.0))
    parser = cli.build_parser()
    assert parser.parse_args(["embed", "ct.nii.gz", "--runtime", "tensorrt"]).runtime == "tensorrt"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "pelvis" in " ".join(sub.choices["segment"].format_help().split())
    # one dispatch table: every command knows its function
    assert {name: p.get_default("func").__name__ for name, p in sub.choices.items()} == {
        name: f"cmd_{name}" for name in sub.choices}


def test_series_uid_chooses_the_dicom_series(tmp_path, capsys):
    from test_io import make_dicom_series, oblique_image

    from SAMSegmentLib import cli

    folder = tmp_path / "dcm"
    make_dicom_series(folder, oblique_image(shape_kji=(5, 16, 18)), "1.2.826.0.1.3680043.2.1125.1.1111")
    make_dicom_series(folder, oblique_image(shape_kji=(3, 16, 18)), "1.2.826.0.1.3680043.2.1125.1.2222")
    parser = cli.build_parser()
    base = ["propagate", str(folder), "--out", str(tmp_path / "m.nii.gz")]
    assert cli._read(parser.parse_args(base))[0].shape == (5, 16, 18)  # the larger series by default
    chosen = parser.parse_args(base + ["--series-uid", "1.2.826.0.1.3680043.2.1125.1.2222"])
    assert cli._read(chosen)[0].shape == (3, 16, 18)
    # a wrong UID, or a UID for a plain file, is refused before the model loads
    assert main(["segment", str(folder), "--series-uid", "9.9", "--slice", "1", "--box", "1", "1", "9", "9",
                 "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "is not in" in capsys.readouterr().err
    assert main(["embed", IMAGE, "--series-uid", "9.9", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "DICOM folder" in capsys.readouterr().err


class _FakeSession:
    """Stands in for the model session of a command, to interrupt it without loading a model."""

    def __init__(self, interrupt):
        self.interrupt = interrupt
        self.cancel = None
        self.model_id = "fake"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def set_volume(self, *args, **kwargs):
        return None

    def encode_slices(self, refs, progress=None, cancel=None):
        self.cancel = cancel
        progress(1, len(refs), "slice 0")
        raise self.interrupt


def test_ctrl_c_cancels_the_engine_and_exits_130(tmp_path, capsys, monkeypatch):
    """embed and samaug go through the same progress/Ctrl-C helper: the engine's cancel token is
    set, the command exits 130 with the message for what was kept."""
    from SAMSegmentLib import cli, samaug

    fake = _FakeSession(KeyboardInterrupt())
    monkeypatch.setattr(cli, "_session", lambda args: fake)
    assert main(["embed", IMAGE, "--cache-dir", str(tmp_path / "cache")]) == 130
    assert fake.cancel is not None and fake.cancel.cancelled
    assert "interrupted; the slices encoded so far are kept in" in capsys.readouterr().err

    seen = {}

    def batch(inputs, out, session, axis, params, progress=None, slice_progress=None, cancel=None, **kwargs):
        seen["cancel"] = cancel
        slice_progress(1, 3, "slice 0")
        raise KeyboardInterrupt

    monkeypatch.setattr(samaug, "samaug_batch", batch)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii.gz").write_bytes(open(IMAGE, "rb").read())
    assert main(["samaug", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 130
    assert seen["cancel"].cancelled
    assert "finished cases are kept, run the same command again to resume" in capsys.readouterr().err
