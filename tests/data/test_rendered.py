import numpy as np
import pytest
import torch

from doppel.data.dataset import Part
from doppel.data.readers.rendered_npz import bundled_path, load_rendered_npz, read_rendered_npz
from doppel.data.split import split_dataset
from tests.conftest import load_script, write_emoji_npz


def test_family_key_groups_skin_tone_gender_and_hair_variants():
    family_key = load_script("build_emoji_dataset").family_key
    assert family_key("1F3C3") == family_key("1F3C3-1F3FB") == family_key("1F3C3-200D-2642-FE0F")
    assert family_key("1F3C3-1F3FF-200D-2640-FE0F") == "1F3C3"
    assert family_key("1F468-200D-1F9B0") == family_key("1F469-1F3FD-200D-1F9B0") == "1F9D1-200D-1F9B0"
    assert family_key("1F600") != family_key("1F603")


def test_split_keeps_families_whole_and_roles_consistent(tiny_npz):
    data = load_rendered_npz(tiny_npz)
    split = split_dataset(read_rendered_npz(tiny_npz), novel_fraction=0.4)
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
    image = read_rendered_npz(tiny_npz).images[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert torch.equal(image, torch.from_numpy(data.images[0]).permute(2, 0, 1))


def test_a_base_query_is_the_image_its_class_key_hashes_to():
    """The held-out image of a base class is image floor(h * n) of its n images, h the first 8 bytes of
    SHA-256(class key) as a fraction (computed here with hashlib): not always the first image."""
    import hashlib

    data = read_rendered_npz()
    split = split_dataset(data, max_groups=200)
    positions = []
    for label in range(split.num_classes):
        rows = torch.nonzero(split.label == label).flatten()
        key = data.keys[int(data.labels[split.index[rows[0]]])]
        fraction = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        [held_out] = torch.nonzero(split.part[rows] == Part.HELD_OUT).flatten().tolist()
        assert held_out == int(fraction * len(rows)), key
        positions.append(held_out)
    assert set(positions) == {0, 1, 2, 3}  # the bundled emoji: up to 4 vendors' drawings


def test_split_is_stable_and_max_groups_subsets(tiny_npz):
    data = read_rendered_npz(tiny_npz)
    a, b = split_dataset(data, 0.4), split_dataset(data, 0.4)
    assert a.names == b.names and torch.equal(a.part, b.part)
    small = split_dataset(data, 0.4, max_groups=8)
    assert len(small.names) < len(a.names)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_rendered_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="lacks arrays"):
        load_rendered_npz(tmp_path / "partial.npz")
    path = write_emoji_npz(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="prototype_vendor"):
        read_rendered_npz(path, prototype_vendor="apple")


def test_bundled_dataset_is_the_documented_one():
    data = load_rendered_npz(bundled_path("emoji32.npz"))
    assert bundled_path("emoji32.npz").stat().st_size <= 20 * 2**20
    assert len(data.identity_code) == 3786
    assert data.images.shape[1:] == (32, 32, 3)
    vendors = list(map(str, data.vendor_name))
    assert vendors == ["twitter", "google", "openmoji_color", "openmoji_outline"]
    # no outline drawing of a flag (they are empty rectangles)
    flags = {i for i, n in enumerate(data.identity_name) if str(n).endswith("Flag")}
    outline = data.identity[data.vendor == vendors.index("openmoji_outline")]
    assert not flags & set(outline.tolist())
    split = split_dataset(read_rendered_npz())
    assert 0.15 < (split.label >= split.num_classes).float().mean() < 0.3


# --- the bundled CJK characters (scripts/build_cjk_dataset.py) ---

def test_common_characters_are_those_of_all_three_standards_first_levels():
    build = load_script("build_cjk_dataset")
    assert build.is_common("人") and build.is_common("未") and build.is_common("末")
    assert not build.is_common("们")  # simplified only
    assert not build.is_common("們")  # traditional only
    assert not build.is_common("鬱")  # in all three, but in no first level
    assert not build.is_common("A")


def test_a_typeface_that_draws_a_character_empty_is_caught():
    build = load_script("build_cjk_dataset")
    per_face = np.full((3, 3, 8, 8), 255, np.uint8)  # 3 typefaces, 3 characters
    per_face[:, 0] = 0  # character 0: all ink
    per_face[:, 1, 0, :] = 0  # character 1: an 8-pixel stroke ...
    per_face[2, 1] = 255  # ... that typeface 2 leaves empty
    per_face[:, 2, 0, 0] = 0  # character 2: little ink everywhere (like 一) is drawn
    assert build.drawn(per_face).tolist() == [[True, True, True], [True, True, True], [True, False, True]]


def test_lookalikes_are_the_nearest_by_blurred_ink_cosine_averaged_over_typefaces():
    build = load_script("build_cjk_dataset")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 7, 6, 6)).astype(np.uint8)  # 3 typefaces, 7 characters
    ink = 1.0 - images / 255.0
    blurred = np.zeros_like(ink)
    for y in range(6):
        for x in range(6):  # 3x3 mean with zero padding, written as a loop
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < 6 and 0 <= x + dx < 6:
                        blurred[..., y, x] += ink[..., y + dy, x + dx] / 9.0
    similarity = np.zeros((7, 7))
    for a in range(7):
        for b in range(7):
            for face in range(3):
                u, v = blurred[face, a].ravel(), blurred[face, b].ravel()
                similarity[a, b] += u @ v / np.linalg.norm(u) / np.linalg.norm(v) / 3
    expected = [[b for b in np.argsort(-similarity[a], kind="stable") if b != a][:2] for a in range(7)]
    assert build.lookalikes(images, k=2).tolist() == expected


@pytest.fixture(scope="module")
def cjk():
    return load_rendered_npz(bundled_path("cjk32.npz"))


def test_bundled_cjk_set_is_the_documented_one(cjk):
    build = load_script("build_cjk_dataset")
    assert bundled_path("cjk32.npz").stat().st_size <= 20 * 2**20
    assert [str(v) for v in cjk.vendor_name] == [face.name for face in build.TYPEFACES]
    assert len(cjk.identity_code) == 1589 and cjk.images.shape == (1589 * 24, 32, 32, 1)
    # identity-major, every character drawn by every typeface, black ink on white
    assert np.array_equal(cjk.identity, np.repeat(np.arange(1589), 24))
    assert np.array_equal(cjk.vendor, np.tile(np.arange(24), 1589))
    assert (cjk.images[:, 0, 0] == 255).mean() > 0.95 and (cjk.images.min(axis=(1, 2, 3)) < 64).all()
    chars = [str(name).split()[0] for name in cjk.identity_name]
    assert all(str(code) == f"U+{ord(c):04X}" for c, code in zip(chars, cjk.identity_code))
    assert all(build.is_common(c) or c in "".join(build.CONFUSABLE_GROUPS) for c in chars)


def test_known_confusables_are_each_others_computed_lookalikes(cjk):
    chars = [str(name).split()[0] for name in cjk.identity_name]
    index = {c: i for i, c in enumerate(chars)}
    near = {c: {chars[j] for j in cjk.lookalike[index[c]]} for c in chars}
    for a, b in ("未末", "土士", "己巳", "已巳", "刀力", "千干", "今令", "矢失", "休体", "免兔", "住往", "鳥烏"):
        assert b in near[a] and a in near[b], (a, b)
    assert "木" not in near["鳥"]


def test_cjk_split_gives_each_novel_character_its_noto_sans_prototype(cjk):
    data = read_rendered_npz(bundled="cjk32.npz", prototype_vendor="noto_sans")
    image = data.images[5]
    assert image.shape == (3, 32, 32) and all(torch.equal(image[c], torch.from_numpy(cjk.images[5, :, :, 0]))
                                              for c in range(3))
    split = split_dataset(data)
    novel = split.label >= split.num_classes
    assert 0.15 < novel.float().mean() < 0.25
    reference = split.part == Part.REFERENCE
    assert (cjk.vendor[split.index[reference].numpy()] == 0).all()
    assert torch.equal(split.label[reference].sort().values, split.label[novel].unique())
    assert ((split.part == Part.QUERY) == (novel & ~reference)).all()
    base_held_out = split.label[split.part == Part.HELD_OUT]
    assert torch.equal(base_held_out.sort().values, torch.arange(split.num_classes))


def test_grey_archives_and_bad_lookalikes(tmp_path):
    path = write_emoji_npz(tmp_path / "rgb.npz")
    with np.load(path) as archive:
        arrays = dict(archive)
    grey = arrays["images"][..., :1]
    np.savez(tmp_path / "grey.npz", **{**arrays, "images": grey})
    data = read_rendered_npz(tmp_path / "grey.npz")
    assert torch.equal(data.images[3], torch.from_numpy(grey[3, :, :, 0]).expand(3, -1, -1))
    bad = np.full((len(arrays["identity_code"]), 2), len(arrays["identity_code"]), np.int32)
    np.savez(tmp_path / "bad.npz", **arrays, lookalike=bad)
    with pytest.raises(ValueError, match="lookalike"):
        load_rendered_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="data.bundled"):
        bundled_path("faces.npz")
