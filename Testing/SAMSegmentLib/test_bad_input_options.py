"""Bad options, extreme intensities, anchor-mask geometry and interrupts (issue 14, the
reliability campaign's cases P13g, P16c/d, P19*, U03, E04, A01/A03/A06, I15c-f, O03b/O06/U04,
S01/S04, T04 and their classes).

Option errors must come with the project's error and remedy, exit code 2, before the image is
segmented and before the model loads: ``no_model`` makes loading a model fail the test.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import ellipsoid_ct
from SAMSegmentLib import cli, sample_data
from SAMSegmentLib.cli import main
from SAMSegmentLib.errors import CancelledError, PromptError, SAMSegmentError, VolumeError

IMAGE = str(sample_data.path(sample_data.IMAGE))
BOX = ["10", "22", "39", "51"]  # the spleen on slice 2 of the crop (slice 22 of the sample)


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ options
# (command line after the image, with {out} for the output folder; a piece of the message)
SEGMENT = ["segment", "{img}", "--slice", "2", "--box", *BOX, "--out", "{out}/m.nii.gz"]
PROPAGATE = ["propagate", "{img}", "--slice", "2", "--box", *BOX, "--out", "{out}/m.nii.gz"]
UNCERTAINTY = ["uncertainty", "{img}", "--slice", "2", "--box", *BOX, "--out", "{out}/u.nii.gz"]
EVERYTHING = ["everything", "{img}", "--slice", "2", "--out", "{out}/e.nii.gz"]
LPS_BOX = ["147.956", "-77.319", "160.30", "60.956", "-164.319", "160.30"]  # the spleen box on slice 2, in mm

BAD_OPTIONS = [
    # non-finite numbers, in every kind of option
    ("P13g", ["segment", "{img}", "--coords", "lps", "--box", "nan", *LPS_BOX[1:], "--out", "{out}/m.nii.gz"],
     "--box nan"),
    ("P04", ["segment", "{img}", "--slice", "2", "--box", "nan", "22", "39", "51", "--out", "{out}/m.nii.gz"],
     "--box nan 22 39 51"),
    ("point-inf", SEGMENT + ["--point", "20", "inf"], "--point 20 inf"),
    ("exclude-nan", SEGMENT + ["--exclude", "nan", "3"], "--exclude nan 3"),
    ("P16c", SEGMENT + ["--cache-mib", "nan"], "--cache-mib nan"),
    ("P16d", SEGMENT + ["--cache-mib", "inf"], "--cache-mib inf"),
    ("cache-mib-1e999", SEGMENT + ["--cache-mib", "1e999"], "--cache-mib inf"),
    ("P14b", SEGMENT + ["--box-margin", "nan"], "--box-margin nan"),
    ("P19d", PROPAGATE + ["--min-iou", "nan"], "--min-iou nan"),
    ("min-score-inf", PROPAGATE + ["--min-score=-inf"], "--min-score -inf"),
    ("U03", UNCERTAINTY + ["--jitter", "nan"], "--jitter nan"),
    ("jitter-inf", UNCERTAINTY + ["--jitter", "inf"], "--jitter inf"),
    ("box-scales-nan", EVERYTHING + ["--box-scales", "0.1", "nan"], "--box-scales 0.1 nan"),
    ("nms-nan", EVERYTHING + ["--nms-iou", "nan"], "--nms-iou nan"),
    ("link-iou-nan", EVERYTHING + ["--link-iou", "nan"], "--link-iou nan"),
    ("min-quality-nan", EVERYTHING + ["--min-quality", "nan"], "--min-quality nan"),
    ("serve-nan", ["serve", "--max-request-mib", "nan"], "--max-request-mib nan"),
    ("serve-cache-inf", ["serve", "--cache-mib", "inf"], "--cache-mib inf"),
    ("demo-cache-nan", ["demo", "--out", "{out}/demo", "--cache-mib", "nan"], "--cache-mib nan"),
    # values that mean nothing whatever the image
    ("P16", SEGMENT + ["--cache-mib", "0"], "--cache-mib 0 must be above 0"),
    ("cache-mib-negative", SEGMENT + ["--cache-mib=-5"], "--cache-mib -5"),
    ("P14", SEGMENT + ["--box-margin=-1"], "--box-margin -1 must be between 0 and 1"),
    ("P19", PROPAGATE + ["--max-slices=-1"], "--max-slices -1 must be at least 1"),
    ("max-slices-0", PROPAGATE + ["--max-slices", "0"], "--max-slices 0"),
    ("P19b", PROPAGATE + ["--range", "4", "0"], "the first slice is after the last"),
    ("range-negative", PROPAGATE + ["--range", "-3", "4"], "slice indices start at 0"),
    ("P19c", PROPAGATE + ["--range", "3", "4"], "Accepted slice(s) 2 lie outside the range 3..4"),
    ("min-iou-2", PROPAGATE + ["--min-iou", "2"], "min_iou"),
    ("P19e", PROPAGATE + ["--min-area=-5"], "min_area_px"),
    ("U01", UNCERTAINTY + ["--samples", "0"], "at least one jittered sample"),
    ("jitter-negative", UNCERTAINTY + ["--jitter=-0.1"], "Jitter must be >= 0"),
    ("seed-negative", UNCERTAINTY + ["--seed=-1"], "Random seed -1"),
    ("E04", EVERYTHING + ["--box-scales", "0"], "Box scales [0.0]"),
    ("box-scales-2", EVERYTHING + ["--box-scales", "2"], "Box scales [2.0]"),
    ("min-stability-2", EVERYTHING + ["--min-stability", "2"], "stability_thresh"),
    ("nms-negative", EVERYTHING + ["--nms-iou=-1"], "nms_iou"),
    ("link-iou-2", EVERYTHING + ["--link-iou", "2"], "--link-iou 2"),
    ("E01", EVERYTHING + ["--grid", "0"], "points_per_side"),
    ("grid-huge", EVERYTHING + ["--grid", "1000000"], "at most 512 per side"),
    ("slice-and-range", EVERYTHING + ["--range", "0", "4"], "--slice and --range"),
    ("everything-range", ["everything", "{img}", "--range", "3", "1", "--out", "{out}/e.nii.gz"], "first slice is after"),
    # prompt and option errors that needed the model before
    ("P07", ["segment", "{img}", "--axis", "x", "--slice", "2", "--box", *BOX, "--out", "{out}/m.nii.gz"],
     "Unknown axis 'x'"),
    ("P05", ["segment", "{img}", "--slice", "-1", "--box", *BOX, "--out", "{out}/m.nii.gz"], "outside the volume"),
    ("P08", SEGMENT + ["--point", "500", "500"], "is outside the 122x101 slice"),
    ("P10", ["segment", "{img}", "--slice", "2", "--point", "25", "35", "--out", "{out}/m.nii.gz"], "segments from a box"),
    ("lps-far", ["segment", "{img}", "--coords", "lps", "--point", "1e308", "1e308", "1e308", "--box", *LPS_BOX,
                 "--out", "{out}/m.nii.gz"], "lies far outside the image"),
    ("anchor-and-prompts", PROPAGATE + ["--anchor-mask", "{img}"], "not both"),
    ("P13e", ["segment", "{img}", "--coords", "lps", "--slice", "0", "--box", *LPS_BOX, "--out", "{out}/m.nii.gz"],
     "lie on slice 2 along axis 0, not on --slice 0"),
    ("P15", SEGMENT + ["--window", "abc"], "Unknown window preset 'abc'"),
    ("P15c", SEGMENT + ["--window", "nan,inf"], "not finite"),
    ("P15e", SEGMENT + ["--window", "5000,6000"], "every voxel has the same value"),
    ("P18", SEGMENT + ["--model", "foo"], "Unknown model 'foo'"),
    ("embed-window", ["embed", "{img}", "--cache-dir", "{out}/c", "--window", "abc"], "Unknown window preset"),
    ("embed-axis", ["embed", "{img}", "--cache-dir", "{out}/c", "--axis", "q"], "Unknown axis 'q'"),
    # outputs, before any work
    ("D02", ["demo", "--out", "{img}"], "is a file"),
    ("U04", UNCERTAINTY + ["--samples", "2", "--prob-out", "{img}", "--overwrite"], "Refusing to write onto the input"),
    ("prob-out-is-out", UNCERTAINTY + ["--prob-out", "{out}/u.nii.gz"], "name the same file"),
    ("png-not-png", SEGMENT + ["--png", "{out}/o.jpg"], "is not a .png file name"),
]


@pytest.mark.parametrize("case,argv,message", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_options_are_refused_before_the_model_loads(case, argv, message, crop, tmp_path, capsys, no_model):
    argv = [a.format(img=crop, out=tmp_path) for a in argv]
    code, err = run(argv, capsys)
    assert code == 2, err
    assert message in err and "what to do:" in err and "Traceback" not in err
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing written


def test_every_float_option_of_every_command_refuses_nan(crop, tmp_path, capsys, no_model):
    """The class, not the listed cases: each float option of each subcommand, given NaN."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    base = {"segment": SEGMENT, "propagate": PROPAGATE, "uncertainty": UNCERTAINTY, "everything": EVERYTHING,
            "embed": ["embed", "{img}", "--cache-dir", "{out}/c"], "demo": ["demo", "--out", "{out}/d"],
            "samaug": ["samaug", "{out}", "--out", "{out}/s"], "serve": ["serve"], "models": ["models"]}
    assert set(sub.choices) == set(base), "a new command: add its minimal command line here"
    tried = 0
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.type is not float:
                continue
            argv = [a.format(img=crop, out=tmp_path) for a in base[name]]
            flag = max(action.option_strings, key=len)
            code, err = run(argv + [flag] + ["nan"] * (action.nargs if isinstance(action.nargs, int) else 1), capsys)
            assert code == 2 and "not a finite number" in err and "what to do:" in err, (name, flag, err)
            tried += 1
    assert tried >= 20


def test_a_cache_dir_that_can_never_be_a_cache_is_refused_before_the_model_loads(crop, tmp_path, capsys, no_model):
    """C09, C08/C08b, C07-like: a file, a folder with someone else's manifest.json, a non-empty folder that
    is not a cache; refused before the model loads, and the user's files are left exactly as they were."""
    user = tmp_path / "project"
    user.mkdir()
    (user / "manifest.json").write_text('{"project": "mine"}', encoding="utf-8")
    (user / "axis1_notes.pt").write_bytes(b"user data")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x", encoding="utf-8")
    for cache_dir, message in ((crop, "is a file, not a folder"), (user, "not an embedding cache's"),
                               (notes, "is not empty and is not an embedding cache")):
        for argv in (["embed", crop, "--cache-dir", str(cache_dir)],
                     SEGMENT[:1] + [crop] + SEGMENT[2:] + ["--cache-dir", str(cache_dir)]):
            argv = [a.format(img=crop, out=tmp_path) for a in argv]
            code, err = run(argv, capsys)
            assert code == 2 and message in err and "what to do:" in err, (argv, err)
    assert (user / "manifest.json").read_text() == '{"project": "mine"}'
    assert (user / "axis1_notes.pt").read_bytes() == b"user data" and (notes / "todo.txt").exists()


def test_existing_outputs_are_refused_before_any_work(crop, tmp_path, capsys, no_model):
    """O06, O03b: an existing --out or --png is refused before the model loads, and nothing is written."""
    existing = tmp_path / "old.nii.gz"
    existing.write_bytes(b"old mask")
    code, err = run(["propagate", crop, "--slice", "2", "--box", *BOX, "--out", str(existing)], capsys)
    assert code == 2 and "already exists" in err and existing.read_bytes() == b"old mask"
    png = tmp_path / "old.png"
    png.write_bytes(b"old png")
    code, err = run(["segment", crop, "--slice", "2", "--box", *BOX, "--out", str(tmp_path / "new.nii.gz"),
                     "--png", str(png)], capsys)
    assert code == 2 and "exists" in err and not (tmp_path / "new.nii.gz").exists() and png.read_bytes() == b"old png"


# ------------------------------------------------------------------------------------------ engine checks
def test_stop_rules_refuse_what_means_nothing():
    from SAMSegmentLib.propagation import StopRules, check_anchors_in_range

    for bad in ({"min_iou": float("nan")}, {"min_score": float("inf")}, {"min_area_px": -1}, {"max_slices": -1},
                {"index_range": (4, 0)}, {"min_intensity_agreement": 1.5}, {"min_area_fraction": float("nan")}):
        with pytest.raises(SAMSegmentError):
            StopRules(**bad)
    rules = StopRules()
    rules.min_iou = float("nan")  # set after construction, as the Slicer module does: propagate checks again
    with pytest.raises(SAMSegmentError, match="min_iou"):
        rules.check()
    check_anchors_in_range({3: None, 4: None}, (3, 4))
    with pytest.raises(PromptError, match="outside the range 3..4"):
        check_anchors_in_range({2: None}, (3, 4))


def test_propagation_refuses_an_anchor_outside_its_range(session, phantom):
    from SAMSegmentLib.propagation import StopRules, propagate

    vol, mask = phantom
    session.set_volume(vol, (-160, 240))
    with pytest.raises(PromptError, match="outside the range"):
        propagate(session, 0, {12: mask[12]}, rules=StopRules(index_range=(14, 20)))
    assert session.encode_count == 0


def test_everything_and_uncertainty_settings_are_checked():
    from SAMSegmentLib.automatic import EverythingParams
    from SAMSegmentLib.uncertainty import check_sampling, jitter_prompts
    from SAMSegmentLib.prompts import Prompts

    for bad in ({"box_scales": (0.0,)}, {"box_scales": ()}, {"box_scales": (float("nan"),)}, {"nms_iou": float("nan")},
                {"stability_thresh": 2.0}, {"pred_iou_thresh": float("nan")}, {"stability_offset": 0.0}):
        with pytest.raises(SAMSegmentError):
            EverythingParams(**bad)
    for n, jitter, seed in ((0, 0.1, 0), (4, float("nan"), 0), (4, float("inf"), 0), (4, -1.0, 0), (4, 0.1, -2)):
        with pytest.raises(SAMSegmentError):
            check_sampling(n, jitter, seed)
    with pytest.raises(SAMSegmentError, match="not a finite number"):
        jitter_prompts(Prompts(box=[10, 10, 40, 40]), 2, float("nan"), 0, 64, 64)


# ------------------------------------------------------------------------------------------ intensities
def _ct() -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(IMAGE)[:, :, 20:25])


@pytest.mark.parametrize("case", ["I15c", "I15d", "I15f"])
def test_one_extreme_voxel_does_not_change_the_auto_window(case, caplog):
    """A single sentinel voxel (1e300, +-1e300, INT32 extremes) in a CT: still the CT preset, and
    the voxels left out are named in a warning; no numpy RuntimeWarning."""
    from SAMSegmentLib.preprocessing import auto_window

    ct = _ct()
    if case == "I15f":
        vol = ct.astype(np.int32)
        vol[0, 0, 0], vol[0, 0, 1] = 2**31 - 1, -(2**31)
    else:
        vol = ct.astype(np.float64)
        vol[0, 0, 0] = 1e300
        if case == "I15d":
            vol[0, 0, 1] = -1e300
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        win = auto_window(vol)
        windowed = win.apply(vol)
    assert win.source.startswith("CT preset") and (win.low, win.high) == (-160.0, 240.0)
    assert "left out when choosing the window" in caplog.text
    reference = auto_window(ct).apply(ct)
    assert np.count_nonzero(windowed != reference) <= 2  # only the outlier voxels themselves


def test_values_beyond_float32_range_window_like_the_same_image_scaled_down():
    """I15e: HU x 1e40 in float64 (beyond float32) gives the picture of HU x 1e30, not two grey values."""
    from SAMSegmentLib.preprocessing import auto_window

    ct = _ct().astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = auto_window(ct * 1e40).apply(ct * 1e40)
        near = auto_window(ct * 1e30).apply(ct * 1e30)
        extreme = np.array([[-1.7e308, 0.0, 1.7e308]])
        from SAMSegmentLib.preprocessing import IntensityWindow

        assert IntensityWindow(-1e307, 1e307).apply(extreme).tolist() in ([[0, 127, 255]], [[0, 128, 255]])
    assert np.unique(far).size > 200
    assert np.array_equal(far, near)


# ------------------------------------------------------------------------------------------ anchor masks
def _anchor(crop_path: str, tmp_path: Path) -> tuple[Path, np.ndarray]:
    image = sitk.ReadImage(crop_path)
    mask = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    mask[2, 28:48, 14:36] = 1
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(image)
    path = tmp_path / "anchor.nii.gz"
    sitk.WriteImage(m, str(path))
    return path, mask


def _anchor_args(crop_path, anchor, tmp_path):
    return cli.build_parser().parse_args(["propagate", crop_path, "--anchor-mask", str(anchor),
                                          "--out", str(tmp_path / "p.nii.gz")])


def test_reoriented_anchor_mask_gives_the_same_anchors(crop, tmp_path, capsys):
    """A06: the same mask stored LPS-canonical (arrays flipped) lands on the same voxels, with a note."""
    from SAMSegmentLib import io as sio

    path, mask = _anchor(crop, tmp_path)
    lps = tmp_path / "anchor_lps.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"), str(lps))
    assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(lps))), mask)  # stored differently
    volume, geometry = sio.read_volume(crop)
    right = cli._anchor_masks(_anchor_args(crop, path, tmp_path), volume, geometry, 0)
    assert capsys.readouterr().err == ""
    moved = cli._anchor_masks(_anchor_args(crop, lps, tmp_path), volume, geometry, 0)
    assert "resampled onto the image grid" in capsys.readouterr().err
    assert right.keys() == moved.keys() == {2}
    assert np.array_equal(right[2], moved[2]) and np.array_equal(right[2], mask[2] > 0)


def test_anchor_mask_elsewhere_in_space_is_refused(crop, tmp_path, capsys, no_model):
    """A01: same array shape, spacing 1 mm and origin 0: it does not lie on the image."""
    path, _ = _anchor(crop, tmp_path)
    wrong = sitk.ReadImage(str(path))
    wrong.SetSpacing((1.0, 1.0, 1.0))
    wrong.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(wrong, str(tmp_path / "wrong.nii.gz"))
    code, err = run(["propagate", crop, "--anchor-mask", str(tmp_path / "wrong.nii.gz"),
                     "--out", str(tmp_path / "p.nii.gz")], capsys)
    assert code == 2 and "does not overlap the image" in err and "spacing 1, 1, 1 mm" in err


def test_anchor_mask_on_a_finer_grid_is_resampled_with_a_note():
    from SAMSegmentLib.io import ImageGeometry
    from SAMSegmentLib.volume import mask_on_grid

    coarse = ImageGeometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)), (10, 10, 4))
    fine = ImageGeometry((1.0, 1.0, 1.0), (-0.5, -0.5, -0.5), coarse.direction, (20, 20, 8))
    mask = np.zeros((8, 20, 20), np.uint8)
    mask[2:4, 4:12, 6:14] = 1  # = coarse voxels k 1, j 2..5, i 3..6
    on_coarse, note = mask_on_grid(mask, fine, coarse)
    assert "spacing 1, 1, 1 mm against 2, 2, 2 mm" in note
    expected = np.zeros((4, 10, 10), np.uint8)
    expected[1, 2:6, 3:7] = 1
    assert np.array_equal(on_coarse, expected)
    same, note = mask_on_grid(expected, coarse, coarse)
    assert same is expected and note == ""
    with pytest.raises(VolumeError, match="does not overlap"):
        mask_on_grid(expected, ImageGeometry(coarse.spacing, (500.0, 0.0, 0.0), coarse.direction, coarse.size), coarse)


@pytest.mark.parametrize("case", ["A03", "A03-copy", "u8-copy", "fractional"])
def test_an_image_given_as_anchor_mask_is_refused(case, crop, tmp_path, capsys, no_model):
    """A03: the image itself, a copy of it (an 8-bit one too: it could pass for a label map), or
    any intensity image, is not a mask."""
    image_path, image = crop, sitk.ReadImage(crop)
    if case == "A03":
        anchor = crop
    else:
        anchor = str(tmp_path / "anchor.nii.gz")
        array = sitk.GetArrayFromImage(image)
        if case == "u8-copy":
            array = np.clip(array + 200, 0, 255).astype(np.uint8)
        elif case == "fractional":
            array = (array > 0).astype(np.float32) * 0.5
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, anchor)
        if case == "u8-copy":
            image_path = str(tmp_path / "image_u8.nii.gz")
            sitk.WriteImage(out, image_path)
    code, err = run(["propagate", image_path, "--anchor-mask", anchor, "--out", str(tmp_path / "p.nii.gz")], capsys)
    assert code == 2 and "what to do:" in err
    assert any(s in err for s in ("is the image itself", "it is not a mask", "a copy of the image")), err


# ------------------------------------------------------------------------------------------ interrupts
def test_worker_closed_is_a_cancellation_the_gui_catches():
    from SAMSegmentLib.worker import InferenceWorker, WorkerClosedError

    worker = InferenceWorker(name="test-worker")
    release = threading.Event()
    worker.submit(release.wait)
    seen: list[object] = []
    queued = threading.Thread(target=lambda: seen.append(_call(worker)))
    queued.start()
    time.sleep(0.1)
    worker.close()
    release.set()
    queued.join(10)
    assert isinstance(seen[0], WorkerClosedError) and isinstance(seen[0], CancelledError)
    with pytest.raises(SAMSegmentError, match="closed"):
        worker.submit(lambda: None)
    with pytest.raises(RuntimeError):  # as before
        worker.submit(lambda: None)
    assert worker.join(10)


def _call(worker):
    try:
        return worker.call(lambda: "ran")
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc


def test_close_during_propagation_returns_the_partial_result(backend):
    """T04: close() from another thread while propagate() runs: the slices decided so far come
    back, every front stopped as CANCELLED, and no exception."""
    from SAMSegmentLib.propagation import StopReason, propagate
    from SAMSegmentLib.session import SegmentationSession

    vol, mask = ellipsoid_ct(shape=(10, 64, 64), radii=(8.0, 18.0, 20.0), center=(5.0, 32.0, 32.0))
    s = SegmentationSession(model=backend)
    s.set_volume(vol, (-160, 240))
    first, closed = threading.Event(), threading.Event()

    def on_slice(ref, m, outcome):
        if not first.is_set():
            first.set()
            assert closed.wait(60)

    out: dict[str, object] = {}

    def job():
        try:
            out["result"] = propagate(s, 0, {5: mask[5]}, direction="up", on_slice=on_slice)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    assert first.wait(60)
    s.close()
    closed.set()
    thread.join(60)
    assert "error" not in out, out.get("error")
    result = out["result"]
    # slice 6 is handed out once slice 7 is decided (its neighbour check); 7 was decided before the close
    assert result.cancelled and sorted(result.masks) == [6, 7]
    assert [stop.reason for stop in result.stops] == [StopReason.CANCELLED]
    assert s.join(60)


def test_first_ctrl_c_cancels_and_a_cancelled_engine_call_exits_130(tmp_path, capsys):
    """embed/everything/samaug raise CancelledError when cancelled: that is an interrupt (130 and
    what was kept), not an error; a CancelledError nobody asked for stays an error."""
    # a test run started in the background (nohup, cmd &) inherits SIGINT ignored, which the CLI then
    # respects; this test is about Ctrl-C reaching it, so it starts from Python's own handler
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt, match="kept"):
        with cli._interruptible(interrupted="kept") as (cancel,):
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only sets the token
            time.sleep(0.05)
            reached.append(cancel.cancelled)
            cancel.raise_if_cancelled()
    assert reached == [True]
    with pytest.raises(CancelledError):
        with cli._interruptible() as (cancel,):
            raise CancelledError("not asked for")
    assert signal.getsignal(signal.SIGINT) is before  # restored
    signal.signal(signal.SIGINT, inherited)


def _cli_process(args: list[str], trigger: str, sigints: list[float], tmp_path: Path) -> tuple[int, str]:
    """Run ``python -m SAMSegmentLib.cli ARGS`` (stderr into stdout) and send SIGINT at each delay
    after the first output line that starts with ``trigger``; (exit status, output)."""
    repo = str(Path(__file__).resolve().parents[2])  # this checkout's engine, whatever is installed
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "SAMSegmentLib.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out, sent = [], False
    for line in proc.stdout:
        out.append(line)
        if not sent and line.startswith(trigger):
            sent, start = True, time.monotonic()
            for delay in sigints:
                time.sleep(max(0.0, start + delay - time.monotonic()))
                proc.send_signal(signal.SIGINT)
    code = proc.wait(120)
    assert sent, "".join(out)
    return code, "".join(out)


@pytest.mark.slow  # subprocesses that load the model and propagate on the sample CT
def test_ctrl_c_during_propagate_writes_the_slices_done(tmp_path):
    """S01: one Ctrl-C writes the anchor and the slices propagated so far, says how many and why;
    --no-partial writes nothing."""
    out = tmp_path / "p.nii.gz"
    code, output = _cli_process(["propagate", IMAGE, "--slice", "22", "--box", *BOX, "--out", str(out)],
                                "Slice 22", [1.0], tmp_path)
    assert code == 130, output
    assert "(cancelled)" in output and "Mask written" in output and "Interrupted (Ctrl-C) after" in output
    done = int(output.split("Propagated to ")[1].split()[0])
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).any(axis=(1, 2))
    assert written[22] and int(written.sum()) == done + 1
    code, output = _cli_process(["propagate", IMAGE, "--slice", "22", "--box", *BOX, "--out",
                                 str(tmp_path / "none.nii.gz"), "--no-partial"], "Slice 22", [1.0], tmp_path)
    assert code == 130 and "--no-partial: nothing was written" in output and not (tmp_path / "none.nii.gz").exists()


@pytest.mark.slow  # a subprocess that loads the model and propagates on the sample CT
@pytest.mark.parametrize("trigger,sigints", [("volume (", [0.05, 0.15]), ("Slice 22", [1.0, 1.05])],
                         ids=["during-the-first-encode", "during-propagation"])
def test_ctrl_c_twice_never_aborts(trigger, sigints, tmp_path):
    """S04: the second Ctrl-C, also while the process waits for a model call to end, stops in order
    (exit 130, nothing written), never with SIGABRT 'terminate called without an active exception'
    or an 'Exception ignored in atexit callback' traceback."""
    code, output = _cli_process(["-v", "propagate", IMAGE, "--slice", "22", "--box", *BOX, "--out",
                                 str(tmp_path / "p.nii.gz")], trigger, sigints, tmp_path)
    assert code == 130, output
    assert "terminate called" not in output and "Traceback" not in output
    assert "nothing was written" in output and not (tmp_path / "p.nii.gz").exists()
