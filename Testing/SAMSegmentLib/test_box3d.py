"""The 3D box prompt and boxes on several slices (issue 15): the geometry of ``Box3D``, what
propagation does with it (seed, nothing outside, stops at its ends, boxes kept inside), drawn boxes
as anchors with the interpolated box between them, and the command line's ``--box3d`` / ``--box-at``."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import box_of, dice
from shared_samples import needs_sample, thick_sample
from SAMSegmentLib import cli, sample_data
from SAMSegmentLib.box3d import Box3D
from SAMSegmentLib.errors import PromptError, VolumeError
from SAMSegmentLib.preprocessing import mask_bbox
from SAMSegmentLib.prompts import Prompts
from SAMSegmentLib.propagation import PromptPolicy, StopReason, StopRules, propagate
from SAMSegmentLib.volume import SliceRef


class Recording:
    """The real session, with every box it decodes recorded per slice (the model still runs)."""

    def __init__(self, session):
        self._s, self.boxes = session, {}

    def __getattr__(self, name):
        return getattr(self._s, name)

    def decode(self, ref, prompts, *args, **kwargs):
        if prompts.box is not None:
            self.boxes.setdefault(ref.index, []).append(np.array(prompts.box))
        return self._s.decode(ref, prompts, *args, **kwargs)


# ------------------------------------------------------------------------------------------ geometry
def test_box3d_geometry_in_every_axis():
    b = Box3D.from_ijk(30, 60, 7, 10, 20, 3)  # ITK order, corners in any order
    assert b.lo == (3, 20, 10) and b.hi == (7, 60, 30)
    assert Box3D.from_json(b.to_json()) == b and b.to_json() == {"lo": [3, 20, 10], "hi": [7, 60, 30]}
    vol = b.mask((9, 70, 40))
    assert vol.sum() == 5 * 41 * 21 and Box3D.from_mask(vol) == b
    for axis in (0, 1, 2):
        index = b.middle(axis)
        plane = np.take(vol, index, axis)  # the slice as propagation sees it: (rows, columns)
        assert b.plane_box(axis).tolist() == mask_bbox(plane).tolist()
        assert np.array_equal(b.plane_mask(vol.shape, axis), plane)
        assert b.slice_range(axis) == (b.lo[axis], b.hi[axis])
    b.check((8, 61, 31))
    with pytest.raises(PromptError, match="outside the volume along axis j"):
        b.check((8, 60, 31))
    with pytest.raises(PromptError, match="is empty"):
        Box3D((3, 4, 5), (3, 2, 5))
    with pytest.raises(PromptError, match="integer"):
        Box3D((3, 4, 5.5), (6, 7, 8))
    with pytest.raises(PromptError, match="empty"):
        Box3D.from_mask(np.zeros((2, 2, 2), bool))


# ------------------------------------------------------------------------------------------ engine
@pytest.mark.slow  # a propagation over the phantom
def test_3d_box_seeds_its_middle_slice_and_nothing_leaves_it(moving):
    s, vol, mask = moving
    full = Box3D.from_mask(mask)
    # cut the object: 4 slices off the top, 5 px off its left side and 3 off the bottom rows
    bounds = Box3D((full.lo[0], full.lo[1], full.lo[2] + 5), (full.hi[0] - 4, full.hi[1] - 3, full.hi[2]))
    rec = Recording(s)
    result = propagate(rec, 0, bounds=bounds)
    middle = bounds.middle(0)
    assert result.outcomes[middle].candidate == "box" and result.outcomes[middle].direction == 0
    written = sorted(result.masks)
    assert written[0] >= bounds.lo[0] and written[-1] == bounds.hi[0]  # the object goes on past the box's top
    assert {(x.direction, x.reason) for x in result.stops if x.direction > 0} == {(1, StopReason.BOX_END)}
    seg = result.to_volume(vol.shape)
    assert not (seg & ~bounds.mask(vol.shape)).any()
    assert dice(seg, mask & bounds.mask(vol.shape)) > 0.9
    widened = s.user_box(SliceRef(0, middle), bounds.plane_box(0))
    for index, boxes in rec.boxes.items():
        for box in boxes:
            assert (box[:2] >= widened[:2] - 1e-9).all() and (box[2:] <= widened[2:] + 1e-9).all(), (index, box)
    # the seed slice follows the caller: an accepted mask inside the box replaces the middle seed
    k = middle - 3
    accepted = s.predict(SliceRef(0, k), Prompts(box=box_of(mask[k]))).mask
    other = propagate(s, 0, {k: accepted}, bounds=bounds)
    assert middle in other.masks and other.outcomes[middle].candidate != "box" and k not in other.masks


@pytest.mark.slow  # two propagations over the phantom
def test_boxes_on_two_slices_fill_the_gap_from_both_with_the_interpolated_box(moving):
    s, vol, mask = moving
    a, b = 7, 17
    boxes = {a: box_of(mask[a]), b: box_of(mask[b])}
    rec = Recording(s)
    # without the second look, whose box comes from the two neighbours' masks after the chain's decodes
    result = propagate(rec, 0, boxes=boxes, policy=PromptPolicy(guide_weight=1.0, neighbour_check=False), direction="both")
    assert result.outcomes[a].candidate == result.outcomes[b].candidate == "box"
    assert set(range(a, b + 1)) <= set(result.masks)
    for i in range(a + 1, b):  # each gap slice from a neighbour, the first ones from the boxes' slices
        assert result.outcomes[i].from_index in (i - 1, i + 1)
        t = (i - a) / (b - a)
        interpolated = s.user_box(SliceRef(0, i), (1 - t) * np.array(boxes[a]) + t * np.array(boxes[b]))
        for box in rec.boxes[i]:  # guide weight 1: every box decoded is the interpolated one
            assert np.allclose(box, interpolated)
    assert np.allclose(rec.boxes[a][0], s.user_box(SliceRef(0, a), boxes[a]))  # drawn boxes are widened as predict's
    seg = result.to_volume(vol.shape)
    assert dice(seg[a:b + 1], mask[a:b + 1]) > 0.93
    # weight 0: the boxes come from the masks alone, and they differ
    rec0 = Recording(s)
    propagate(rec0, 0, boxes=boxes, policy=PromptPolicy(guide_weight=0.0, neighbour_check=False))
    assert any(not np.allclose(rec0.boxes[i][0], rec.boxes[i][0]) for i in range(a + 1, b))


@pytest.mark.slow  # the phantom session (module fixture) loads the model
def test_bad_box_prompts_are_refused_at_the_call(moving):
    s, vol, mask = moving
    box = box_of(mask[12])
    cases = [
        (dict(anchors={12: mask[12]}, boxes={12: box}), PromptError, "both an accepted mask and a box"),
        (dict(boxes={24: box}), VolumeError, "outside the volume"),
        (dict(boxes={12: box[:3]}), PromptError, "four finite numbers"),
        (dict(boxes={12: [1, 2, float("nan"), 5]}), PromptError, "four finite numbers"),
        (dict(bounds=Box3D((0, 0, 0), (30, 10, 10))), PromptError, "outside the volume along axis k"),
        (dict(bounds={"lo": [1, 2]}), PromptError, "Cannot read a 3D box"),
        (dict(bounds={"lo": [1, 2], "hi": [3, 4]}), PromptError, "3 integer"),
        (dict(bounds=Box3D((2, 0, 0), (8, 90, 100)), rules=StopRules(index_range=(10, 20))), PromptError,
         "none in common"),
        (dict(boxes={12: box}, bounds=Box3D((2, 0, 0), (8, 90, 100))), PromptError, "outside the range 2..8"),
        (dict(), PromptError, "at least one accepted slice, a box or a 3D box"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            propagate(s, 0, **kwargs)


# ------------------------------------------------------------------------------------------ command line
IMAGE = str(sample_data.path(sample_data.IMAGE))


@pytest.mark.parametrize("extra, message", [
    (["--box3d", "10", "22", "0", "39", "51", "9"], "outside the volume along axis k"),
    (["--box3d", "10", "22", "1", "39", "51", "3", "--box-at", "4", "10", "22", "39", "51"], "outside the 3D box"),
    (["--box3d", "10", "22", "1", "39", "51", "3", "--coords", "lps"], "voxel indices and boxes only"),
    (["--box-at", "2.5", "10", "22", "39", "51"], "whole number"),
    (["--box-at", "2", "10", "22", "39", "51", "--box-at", "2", "1", "2", "30", "40"], "two boxes on slice 2"),
    (["--box-at", "9", "10", "22", "39", "51"], "outside the volume"),
    (["--box3d", "10", "22", "1", "39", "51", "3", "--slice", "4"], "outside the range 1..3"),
])
def test_bad_box3d_options_are_refused_before_the_model_loads(crop, tmp_path, capsys, no_model, extra, message):
    code = cli.main(["propagate", crop, "--out", str(tmp_path / "m.nii.gz"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "what to do:" in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # loads the model twice, propagates over 5 slices
def test_cli_box3d_writes_nothing_outside_the_box(crop, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    box3d = ["--box3d", "12", "24", "1", "37", "49", "3"]
    assert cli.main(["propagate", crop, *box3d, "--out", str(out)]) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(bool)  # (K, J, I)
    inside = Box3D.from_ijk(12, 24, 1, 37, 49, 3).mask(mask.shape)
    assert mask[1:4].any(axis=(1, 2)).all() and not (mask & ~inside).any()
    printed = capsys.readouterr().out
    assert "end of the 3D box reached" in printed
    # the seed is reported with the model's score, and a middle seed with how to choose another
    seed = next(line for line in printed.splitlines() if "seed:" in line)
    assert f"slice 2 from its box: {int(mask[2].sum())} pixels, model score" in seed and "--slice K" in seed
    assert cli.main(["propagate", crop, *box3d, "--slice", "1", "--out", str(tmp_path / "s1.nii.gz")]) == 0
    seeds = [line for line in capsys.readouterr().out.splitlines() if "seed:" in line]
    assert len(seeds) == 1 and "slice 1 from its box" in seeds[0] and "middle" not in seeds[0]


# ------------------------------------------------------------------ the shared samples (issue 15)
@pytest.mark.slow  # encodes 2 slices of the shared samples
@needs_sample("ct-abdomen-3mm")
@needs_sample("mr-abdomen-3mm")
def test_3d_box_seed_is_decoded_again_from_its_own_box_unless_the_model_loses_it(session):
    """The 3D box's in-plane box is the union of the structure's boxes on all its slices, looser than
    the structure on any one slice: on the CT right kidney the seed mask decoded from it takes in
    tissue beside the kidney, and decoded again from its own box it fits the kidney better. On the MR
    left kidney LiteMedSAM loses part of the kidney from the tighter box (its quality estimate falls):
    the first mask stays (``PromptPolicy.seed_refits``)."""
    no_steps = StopRules(max_slices=0)  # the seed alone
    for name, structure, refit_kept in (("ct-abdomen-3mm", "kidney_right", True), ("mr-abdomen-3mm", "kidney_left", False)):
        vol, ref = thick_sample(name, structure, 1)
        session.set_volume(vol)
        k = int(ref.sum(axis=(1, 2)).argmax())
        bounds = Box3D.from_mask(ref)
        seeds = {}
        for refits in (1, 0):
            result = propagate(session, 0, boxes={k: bounds.plane_box(0)}, bounds=bounds, rules=no_steps,
                               policy=PromptPolicy(seed_refits=refits))
            assert sorted(result.masks) == [k]
            seeds[refits] = result.masks[k]
        assert PromptPolicy().seed_refits == 1
        if refit_kept:
            assert seeds[1].sum() < seeds[0].sum() and dice(seeds[1], ref[k]) > dice(seeds[0], ref[k]) + 0.01
            # a box the user drew inside the 3D box is their prompt: decoded as drawn, never refit
            drawn = {k: mask_bbox(ref[k])}  # 2-3 px inside the 3D box on two sides
            as_drawn = [propagate(session, 0, boxes=drawn, bounds=bounds, rules=no_steps,
                                  policy=PromptPolicy(seed_refits=refits)).masks[k] for refits in (1, 0)]
            np.testing.assert_array_equal(*as_drawn)
        else:
            np.testing.assert_array_equal(seeds[1], seeds[0])


@pytest.mark.slow  # encodes 10 CT slices, two propagations
@needs_sample("ct-abdomen-3mm")
def test_3d_box_end_is_a_taper_not_a_cut_to_rescue(session):
    """On the CT left kidney taken every 3rd slice, the kidney's last slice inside the 3D box holds about
    a quarter of the area of the slice before it; a looser box would "rescue" the small mask there to
    about twice the kidney's size.
    The box says the structure ends on that slice, so the small mask is its end
    (``PromptPolicy.box_end_no_rescue``; measured with that slice decoded as any other, not from the
    previous mask's own box, which ``box_end_tip`` pins below)."""
    vol, ref = thick_sample("ct-abdomen-3mm", "kidney_left", 3)
    session.set_volume(vol)
    k = int(ref.sum(axis=(1, 2)).argmax())
    bounds = Box3D.from_mask(ref)
    last = bounds.slice_range(0)[1]
    runs = {n: propagate(session, 0, boxes={k: bounds.plane_box(0)}, bounds=bounds,
                         policy=PromptPolicy(box_end_no_rescue=n, box_end_tip=False)) for n in (1, 0)}
    assert "rescued" in runs[0].outcomes[last].candidate
    assert "rescued" not in runs[1].outcomes[last].candidate
    assert runs[1].masks[last].sum() < runs[0].masks[last].sum()
    assert dice(runs[1].masks[last], ref[last]) > dice(runs[0].masks[last], ref[last])
    assert dice(runs[1].to_volume(vol.shape), ref) > dice(runs[0].to_volume(vol.shape), ref)


@pytest.mark.slow  # encodes 10 CT slices, two propagations
@needs_sample("ct-abdomen-3mm")
def test_3d_box_end_inside_the_volume_is_decoded_from_the_previous_box_unpadded(session):
    """On the CT right kidney taken every 3rd slice the kidney ends inside the volume on the box's upper
    end (about a third of the area of the slice before) and is cut by the scan at its lower end. The
    padded box from the slice before takes in fat around the tapering end; the previous mask's own box
    (``PromptPolicy.box_end_tip``, ``tip_padding`` 0) bounds the tip. A box face on the volume's edge says nothing
    about where the structure ends: that slice is decoded as any other."""
    vol, ref = thick_sample("ct-abdomen-3mm", "kidney_right", 3)
    session.set_volume(vol)
    k = int(ref.sum(axis=(1, 2)).argmax())
    bounds = Box3D.from_mask(ref)
    first, last = bounds.slice_range(0)
    assert first == 0 and last < vol.shape[0] - 1
    runs = {tip: propagate(session, 0, boxes={k: bounds.plane_box(0)}, bounds=bounds,
                           policy=PromptPolicy(box_end_tip=tip)) for tip in (True, False)}
    assert PromptPolicy().box_end_tip and PromptPolicy().tip_padding == 0.0
    assert "3D box's end" in runs[True].outcomes[last].candidate
    assert "3D box's end" not in runs[False].outcomes[last].candidate
    assert runs[True].masks[last].sum() < runs[False].masks[last].sum()
    assert dice(runs[True].masks[last], ref[last]) > dice(runs[False].masks[last], ref[last]) + 0.03
    np.testing.assert_array_equal(runs[True].masks[first], runs[False].masks[first])  # the volume's edge
    assert dice(runs[True].to_volume(vol.shape), ref) > dice(runs[False].to_volume(vol.shape), ref)


@pytest.mark.slow  # encodes 10 CT slices, three propagations
@needs_sample("ct-abdomen-3mm")
def test_3d_box_last_slice_gets_the_structures_tip_where_the_stop_rules_end_one_short(session):
    """The CT spleen taken every 3rd slice ends on the volume's first slice with a tip of 27 px, mostly
    partial volume: its intensities fail the stop rule, so the front stops on the slice before. The
    3D box says the spleen reaches that slice, so it gets the mask of the previous mask's box, as long
    as that mask tapers (keeps less than ``PromptPolicy.box_end_tip_below`` of the previous area; the
    tip keeps about a quarter). Without the 3D box (one box) the front stops there as before."""
    vol, ref = thick_sample("ct-abdomen-3mm", "spleen", 3)
    session.set_volume(vol)
    k = int(ref.sum(axis=(1, 2)).argmax())
    bounds = Box3D.from_mask(ref)
    first = bounds.slice_range(0)[0]
    assert first == 0 and 0 < ref[first].sum() < 0.3 * ref[first + 1].sum()
    runs = {below: propagate(session, 0, boxes={k: bounds.plane_box(0)}, bounds=bounds,
                             policy=PromptPolicy(box_end_tip_below=below)) for below in (0.6, 0.2, 0.0)}
    assert PromptPolicy().box_end_tip_below == 0.6
    tip = runs[0.6].masks[first]
    assert "structure's tip" in runs[0.6].outcomes[first].candidate
    assert dice(tip, ref[first]) > 0.8
    for below in (0.2, 0.0):  # a tip kept to less than 20 % of the previous area, or none: the front stops
        assert first not in runs[below].masks
        down = [stop for stop in runs[below].stops if stop.direction == -1]
        assert down[0].reason == StopReason.INTENSITY and down[0].at_index == first
    assert dice(runs[0.6].to_volume(vol.shape), ref) > dice(runs[0.0].to_volume(vol.shape), ref)
    anchor = session.predict(SliceRef(0, k), Prompts(box=bounds.plane_box(0))).mask
    one_box = propagate(session, 0, {k: anchor})
    assert first not in one_box.masks
