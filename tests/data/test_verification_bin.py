"""Verification packs and dataset pickles load as data, never as code."""

import os
import pickle

import numpy as np
import pytest
import torch

from doppel.data.dataset import DataError
from doppel.data.readers.safe_pickle import safe_load
from doppel.data.readers.verification_bin import read_verification_bin, write_verification_bin
from tests.conftest import ROOT, load_script
from tests.data.formats import encode, identities

PNG = load_script("fixtures/py2_verification_bin").PNG


def test_a_python2_protocol2_pack_written_by_python27_loads():
    pack = read_verification_bin(ROOT / "tests" / "data" / "files" / "py2_pairs.bin")
    assert pack.issame.tolist() == [True, False]
    assert [pack.images.fetch(i) for i in range(4)] == [PNG, PNG, PNG, PNG + b"\0"]
    assert torch.equal(pack.images[0], (torch.arange(48, dtype=torch.uint8) * 5).view(3, 4, 4))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_packs_round_trip_through_our_writer(tmp_path, protocol):
    images = [encode(image, "jpg") for images in identities(3, 2) for image in images]
    write_verification_bin(tmp_path / "p.bin", images, [True, False, True], protocol=protocol)
    assert pickle.loads((tmp_path / "p.bin").read_bytes()) == (images, [True, False, True])  # the stock layout
    pack = read_verification_bin(tmp_path / "p.bin")
    assert [pack.images.fetch(i) for i in range(6)] == images and pack.issame.tolist() == [True, False, True]


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_malicious_pack_is_refused_and_nothing_runs(tmp_path):
    proof = tmp_path / "pwned"
    payload = pickle.dumps(([PNG, PNG], [CreatesAFile(proof)]), protocol=4)
    (tmp_path / "evil.bin").write_bytes(payload)
    refused = r"refused to load it: it imports posix.system at byte \d+.*nothing was executed"
    with pytest.raises(DataError, match=refused) as error:
        read_verification_bin(tmp_path / "evil.bin")
    # the refusal alone, not re-worded as a damaged file
    assert str(error.value).startswith(f"{tmp_path / 'evil.bin'}: refused to load it: it imports posix.system")
    assert "damaged" not in str(error.value) and "not a readable pickle" not in str(error.value)
    assert not proof.exists()
    pickle.loads(payload)  # the same bytes through pickle: the file appears, which is what was prevented
    assert proof.exists()


def test_packs_with_wrong_contents_are_refused(tmp_path):
    cases = {
        "odd": (([PNG] * 3, [True]), "3 images, an odd number"),
        "count": (([PNG] * 4, [True]), "4 images for 1 issame flags"),
        "magic": (([PNG, b"GIF89a"], [True]), "image 1 \\(pair 0\\) is not JPEG or PNG"),
        "flags": (([PNG, PNG], [1]), "issame must hold booleans"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(content, protocol=4))
        with pytest.raises(DataError, match=message):
            read_verification_bin(tmp_path / name)
    (tmp_path / "cut").write_bytes(pickle.dumps(([PNG, PNG], [True]), protocol=4)[:-30])
    with pytest.raises(DataError, match="cut"):
        read_verification_bin(tmp_path / "cut")


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_arrays_are_rebuilt_without_importing_numpy_from_the_file(protocol):
    batch = {b"data": np.arange(24, dtype=np.uint8).reshape(2, 12), b"labels": [3, 7],
             b"weights": np.array([[1.5, -2.0]], dtype=">f4"), "fortran": np.asfortranarray(np.arange(6).reshape(2, 3))}
    loaded = safe_load(pickle.dumps(batch, protocol=protocol), "batch", arrays=True)
    assert set(loaded) == {"data", "labels", "weights", "fortran"}
    for key, original in (("data", batch[b"data"]), ("weights", batch[b"weights"]), ("fortran", batch["fortran"])):
        assert loaded[key].dtype == original.dtype and np.array_equal(loaded[key], original)
    assert loaded["labels"] == [3, 7]
    with pytest.raises(DataError, match="imports numpy"):
        safe_load(pickle.dumps(batch, protocol=protocol), "batch")  # arrays only where a format has them


def test_pairs_lists_pack_into_a_bin_that_reads_back_byte_for_byte(tmp_path):
    script = load_script("pack_verification_bin")
    for name in ("Ann_Lee", "Bo_Kim"):
        (tmp_path / name).mkdir()
        for i in (1, 2):
            (tmp_path / name / f"{name}_{i:04d}.jpg").write_bytes(encode(identities(1, 1, seed=i)[0][0], "jpg"))
    (tmp_path / "pairs.txt").write_text("1\t2\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Kim\t2\n")
    (tmp_path / "generic.txt").write_text("Ann_Lee/Ann_Lee_0001.jpg Bo_Kim/Bo_Kim_0001.jpg 0\n")
    for pairs, expected in (("pairs.txt", [("Ann_Lee", 1), ("Ann_Lee", 2), ("Ann_Lee", 1), ("Bo_Kim", 2)]),
                            ("generic.txt", [("Ann_Lee", 1), ("Bo_Kim", 1)])):
        script.main(["--pairs", str(tmp_path / pairs), "--root", str(tmp_path), "--out", str(tmp_path / "out.bin")])
        pack = read_verification_bin(tmp_path / "out.bin")
        files = [(tmp_path / n / f"{n}_{i:04d}.jpg").read_bytes() for n, i in expected]
        assert [pack.images.fetch(i) for i in range(len(files))] == files
        assert pack.issame.tolist() == ([True, False] if pairs == "pairs.txt" else [False])
