import numpy as np
import pytest
import torch

from doppel.data.dataset import Part
from doppel.data.readers.emoji_npz import bundled_path, load_emoji_npz, read_emoji_npz
from doppel.data.split import split_dataset
from tests.conftest import load_script, write_emoji_npz


def test_family_key_groups_skin_tone_gender_and_hair_variants():
    family_key = load_script("build_emoji_dataset").family_key
    assert family_key("1F3C3") == family_key("1F3C3-1F3FB") == family_key("1F3C3-200D-2642-FE0F")
    assert family_key("1F3C3-1F3FF-200D-2640-FE0F") == "1F3C3"
    assert family_key("1F468-200D-1F9B0") == family_key("1F469-1F3FD-200D-1F9B0") == "1F9D1-200D-1F9B0"
    assert family_key("1F600") != family_key("1F603")


def test_split_keeps_families_whole_and_roles_consistent(tiny_npz):
    data = load_emoji_npz(tiny_npz)
    split = split_dataset(read_emoji_npz(tiny_npz), novel_fraction=0.4)
    base = split.label[split.part <= Part.HELD_OUT].unique()
    novel = split.label[split.part >= Part.REFERENCE].unique()
    assert torch.equal(base, torch.arange(split.num_classes))
    assert (novel >= split.num_classes).all()
    # families are never split: all identities of a family are on one side
    name_to_identity = {str(n): i for i, n in enumerate(data.identity_name)}
    side = {}
    for label in range(len(split.names)):
        family = int(data.identity_family[name_to_identity[split.names[label]]])
        side.setdefault(family, set()).add(label < split.num_classes)
    assert all(len(s) == 1 for s in side.values())
    # each novel identity: exactly one prototype (from twitter, vendor 0) and at least one query
    for label in novel.tolist():
        roles = split.part[split.label == label]
        assert (roles == Part.REFERENCE).sum() == 1 and (roles == Part.QUERY).sum() >= 1
    # base identities with >= 3 images hold exactly one out; all keep >= 2 training images
    for label in base.tolist():
        roles = split.part[split.label == label]
        n_test = int((roles == Part.HELD_OUT).sum())
        assert n_test == (1 if len(roles) >= 3 else 0)
        assert (roles == Part.TRAIN).sum() >= 2
    assert (data.vendor[split.index[split.part == Part.REFERENCE]] == 0).all()
    image = read_emoji_npz(tiny_npz).images[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert torch.equal(image, torch.from_numpy(data.images[0]).permute(2, 0, 1))


def test_split_is_stable_and_max_groups_subsets(tiny_npz):
    data = read_emoji_npz(tiny_npz)
    a, b = split_dataset(data, 0.4), split_dataset(data, 0.4)
    assert a.names == b.names and torch.equal(a.part, b.part)
    small = split_dataset(data, 0.4, max_groups=8)
    assert len(small.names) < len(a.names)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_emoji_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="lacks arrays"):
        load_emoji_npz(tmp_path / "partial.npz")
    path = write_emoji_npz(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="prototype_vendor"):
        read_emoji_npz(path, prototype_vendor="apple")


def test_bundled_dataset_is_the_documented_one():
    data = load_emoji_npz(bundled_path())
    assert bundled_path().stat().st_size <= 20 * 2**20
    assert len(data.identity_code) == 3786
    assert data.images.shape[1:] == (32, 32, 3)
    vendors = list(map(str, data.vendor_name))
    assert vendors == ["twitter", "google", "openmoji_color", "openmoji_outline"]
    # no outline drawing of a flag (they are empty rectangles)
    flags = {i for i, n in enumerate(data.identity_name) if str(n).endswith("Flag")}
    outline = data.identity[data.vendor == vendors.index("openmoji_outline")]
    assert not flags & set(outline.tolist())
    split = split_dataset(read_emoji_npz())
    assert 0.15 < (split.label >= split.num_classes).float().mean() < 0.3
