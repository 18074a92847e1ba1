"""RecordIO without mxnet, against packs written by real mxnet 1.9.1 (scripts/fixtures/mxnet_recordio.py)."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from doppel.data.dataset import DataError
from doppel.data.readers.recordio import (
    MAGIC,
    RecordFile,
    frame,
    pack,
    read_index,
    read_recordio,
    unpack,
    write_recordio,
)
from tests.conftest import ROOT, load_script
from tests.data.formats import encode

MXNET = ROOT / "tests" / "data" / "files" / "mxnet"
FIXTURE = load_script("fixtures/mxnet_recordio")


def payloads(path: Path) -> list[tuple[list[float], bytes]]:
    rec = RecordFile(path)
    keys, offsets = read_index(path.with_suffix(".idx"))
    return [tuple(x.tolist() if i == 0 else x for i, x in enumerate(unpack(rec.read(int(o), "r"), "r")))
            for o in offsets]


@pytest.mark.parametrize("name", ["insightface", "im2rec"])
def test_every_record_of_an_mxnet_pack_reads_back_with_its_labels_and_bytes(name):
    written = FIXTURE.records()[name]
    read = payloads(MXNET / f"{name}.rec")
    assert [(labels, payload) for _, labels, payload in written] == [(list(lab), p) for lab, p in read]
    # mxnet split the records whose payload holds the magic at aligned positions: first, middle, last parts
    raw = (MXNET / f"{name}.rec").read_bytes()
    flags = [struct.unpack_from("<I", raw, i + 4)[0] >> 29 for i in range(0, len(raw) - 3, 4)
             if struct.unpack_from("<I", raw, i)[0] == MAGIC]
    assert 2 in flags and flags.count(1) == flags.count(3) >= 1


def test_our_framing_writes_mxnet_bytes():
    for name, records in FIXTURE.records().items():
        ours = b"".join(frame(pack(labels[0] if len(labels) == 1 else labels, payload, key))
                        for key, labels, payload in records)
        assert ours == (MXNET / f"{name}.rec").read_bytes()


def test_insightface_pack_gives_classes_from_its_images_and_identity_records():
    data = read_recordio(str(MXNET / "insightface.rec"))
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    written = [payload for key, _, payload in FIXTURE.records()["insightface"] if 1 <= key <= 6]
    assert [data.images.fetch(i) for i in range(6)] == written
    image = data.images[0]  # the PNG: pixel values 0, 5, ..., 235 in CHW order
    assert torch.equal(image, (torch.arange(48, dtype=torch.uint8) * 5).view(3, 4, 4))


def test_im2rec_pack_without_record_zero_renumbers_classes_densely():
    data = read_recordio(str(MXNET / "im2rec.rec"))
    assert data.labels.tolist() == [0, 1, 1, 2, 2]
    assert data.class_names == ["0", "3", "5"]
    assert data.images.fetch(2) == FIXTURE.records()["im2rec"][2][2]


def jpeg(value: int, size: int = 8) -> bytes:
    return encode(torch.full((3, size, size), value, dtype=torch.uint8), "jpg")


def test_our_writer_round_trips_and_mxnet_layout_is_kept(tmp_path):
    classes = [(0, [jpeg(10), jpeg(20)]), (1, [jpeg(30)]), (2, [jpeg(40), jpeg(50), struct.pack("<I", MAGIC) * 2])]
    count = write_recordio(tmp_path / "train.rec", iter(classes))
    assert count == 6
    data = read_recordio(str(tmp_path))  # the folder: train.rec + train.idx
    assert data.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert [data.images.fetch(i) for i in range(6)] == [b for _, images in classes for b in images]
    keys, _ = read_index(tmp_path / "train.idx")
    assert keys.tolist() == list(range(10))  # record 0, 6 images, 3 identity records
    first = unpack(RecordFile(tmp_path / "train.rec").read(0, "r"), "r")[0]
    assert first.tolist() == [7.0, 10.0]


def corrupt(tmp_path, change) -> Path:
    tmp_path.mkdir(exist_ok=True)
    write_recordio(tmp_path / "train.rec", iter([(0, [jpeg(1), jpeg(2)]), (1, [jpeg(3), jpeg(4)])]))
    change(tmp_path / "train.rec", tmp_path / "train.idx")
    return tmp_path / "train.rec"


def test_damaged_packs_are_refused_naming_file_and_record(tmp_path):
    def truncate(rec, idx):
        rec.write_bytes(rec.read_bytes()[:-20])

    with pytest.raises(DataError, match="truncated"):
        read_recordio(str(corrupt(tmp_path / "a", truncate)))

    def offset_past_end(rec, idx):
        idx.write_text(idx.read_text().replace("\t0\n", "\t999999\n", 1))

    with pytest.raises(DataError, match="past the end"):
        read_recordio(str(corrupt(tmp_path / "b", offset_past_end)))

    def shifted_offsets(rec, idx):
        lines = idx.read_text().splitlines()
        key, offset = lines[2].split("\t")
        lines[2] = f"{key}\t{int(offset) + 4}"
        idx.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError, match="does not start with the RecordIO magic"):
        read_recordio(str(corrupt(tmp_path / "c", shifted_offsets)))

    with pytest.raises(DataError, match="not 'key<TAB>offset'"):
        read_recordio(str(corrupt(tmp_path / "d", lambda rec, idx: idx.write_text("0 0\n"))))


def test_labels_past_float32_exact_integers_are_refused(tmp_path):
    for value, message in ((2.0**24, "at or past 2\\*\\*24"), (1.5, "not a class index"), (-1.0, "not a class index")):
        folder = tmp_path / str(value)
        folder.mkdir()
        with open(folder / "train.rec", "wb") as rec:
            rec.write(frame(pack(0.0, jpeg(1), 0)) + frame(pack(value, jpeg(2), 1)))
        (folder / "train.idx").write_text(f"0\t0\n1\t{len(frame(pack(0.0, jpeg(1), 0)))}\n")
        with pytest.raises(DataError, match=message):
            read_recordio(str(folder / "train.rec"))


def test_identity_records_that_disagree_with_image_labels_are_refused(tmp_path):
    def swap(rec, idx):
        data = bytearray(rec.read_bytes())
        keys, offsets = read_index(idx)
        first_identity = int(offsets[list(keys).index(5)])  # identity 0: images [1, 3) -> claim [1, 4)
        struct.pack_into("<f", data, first_identity + 8 + 28, 4.0)
        rec.write_bytes(bytes(data))

    with pytest.raises(DataError, match="identity record 0 gives images \\[1, 4\\)"):
        read_recordio(str(corrupt(tmp_path, swap)))


def test_headers_are_read_in_one_gather_and_match_record_by_record_reads(tmp_path):
    rng = np.random.default_rng(0)
    classes = [(c, [bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8)) for _ in range(3)])
               for c in range(50)]
    write_recordio(tmp_path / "train.rec", iter(classes))
    data = read_recordio(str(tmp_path / "train.rec"))
    assert data.labels.tolist() == [c for c, images in classes for _ in images]
    assert [data.images.fetch(i) for i in range(len(data.labels))] == [b for _, images in classes for b in images]


def test_folder_and_csv_pack_into_recordio_with_the_same_bytes_and_classes(tmp_path):
    from doppel.data.readers.csv_manifest import read_csv
    from doppel.data.readers.folder import read_folder
    from tests.data.formats import identities, write_folder

    root = write_folder(tmp_path / "faces", identities(4, 3), "jpg")
    script = load_script("pack_recordio")
    script.main(["--folder", str(root), "--out", str(tmp_path / "a" / "train.rec")])
    folder, packed = read_folder(str(root)), read_recordio(str(tmp_path / "a"))
    assert torch.equal(packed.labels, folder.labels)
    assert [packed.images.fetch(i) for i in range(12)] == [folder.images.fetch(i) for i in range(12)]
    # a manifest listing classes out of order: packed grouped by class, same bytes per class
    rows = [f"faces/id{c:03d}/{i:02d}.jpg,{c}" for i in range(3) for c in (3, 1, 0, 2)]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    script.main(["--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "b" / "train.rec")])
    listed, packed = read_csv(str(tmp_path / "list.csv")), read_recordio(str(tmp_path / "b" / "train.rec"))
    for c in range(4):
        want = sorted(listed.images.fetch(i) for i in torch.nonzero(listed.labels == c).flatten().tolist())
        got = sorted(packed.images.fetch(i) for i in torch.nonzero(packed.labels == c).flatten().tolist())
        assert want == got and len(got) == 3


def test_headers_gathered_in_chunks_equal_one_gather(tmp_path):
    from doppel.data.readers.recordio import _image_headers

    classes = [(c, [jpeg(c), struct.pack("<I", MAGIC) * 7]) for c in range(30)]  # every 2nd record split
    write_recordio(tmp_path / "train.rec", iter(classes))
    keys, offsets = read_index(tmp_path / "train.idx")
    rec = RecordFile(tmp_path / "train.rec")
    images = offsets[(keys >= 1) & (keys <= 60)]
    image_keys = keys[(keys >= 1) & (keys <= 60)]
    whole, chunked = _image_headers(rec, images, image_keys), _image_headers(rec, images, image_keys, chunk=7)
    assert np.array_equal(whole, chunked)
    assert whole["label"].tolist() == [float(c) for c in range(30) for _ in range(2)]


def test_an_image_record_shorter_than_its_header_is_named(tmp_path):
    """An im2rec-style pack (no record 0 ranges) whose record 2 is 10 bytes: too short for the 24-byte header."""
    records = [pack(0.0, jpeg(1)), pack(0.0, jpeg(2)), b"\x01" * 10, pack(1.0, jpeg(3))]
    lines, offset = [], 0
    with open(tmp_path / "train.rec", "wb") as rec:
        for key, record in enumerate(records):
            lines.append(f"{key}\t{offset}\n")
            framed = frame(record)
            rec.write(framed)
            offset += len(framed)
    (tmp_path / "train.idx").write_text("".join(lines))
    with pytest.raises(DataError, match=r"train\.rec: record 2 \(at byte \d+\) is 10 bytes, shorter than the "
                                        r"24-byte image record header"):
        read_recordio(str(tmp_path))
