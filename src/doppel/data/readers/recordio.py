"""InsightFace / MXNet RecordIO (``train.rec`` + ``train.idx``: MS1MV2, CASIA-WebFace, Glint360K), read
and written without mxnet (``data=recordio``).

Framing (dmlc-core): every part starts with the magic 0xCED7230A and a uint32 whose low 29 bits are the
part's length and high 3 bits a flag (0: a whole record; 1, 2, 3: first, middle, last part), then the
bytes, padded to 4. The writer splits a record wherever its payload holds the magic at a 4-byte-aligned
position, dropping that magic, so a reader rejoins the parts with it. The ``.idx`` is text,
``key<TAB>offset`` per line; offsets are always taken from it.

Payload: a 24-byte header ``<IfQQ`` (flag, label, id, id2); flag > 0 means ``flag`` float32 labels follow
(the first is the class) and the header's own label is unused; then the encoded image. InsightFace packs
start with record 0, whose labels are ``[first identity record, end)``: images are records 1 ..
first-1 and identity records give each class's image range ``[start, end)``. im2rec packs have no
record 0 and every record is an image with its label. Labels are float32: a class id past 2**24 cannot be
stored exactly, so such packs are refused unless identity records give the classes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from doppel.data.dataset import DataError, EncodedImages, IdentityData, require
from doppel.data.index_cache import cached_arrays, from_mapped_state, mapped_state

MAGIC = 0xCED7230A
HEADER = struct.Struct("<IfQQ")
HEADER_DTYPE = np.dtype([("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8")])
EXACT_FLOAT = 2**24  # float32 holds every integer below this exactly


def _parts(length_word: int) -> tuple[int, int]:
    return length_word >> 29, length_word & ((1 << 29) - 1)


class RecordFile:
    """Random access to the records of a ``.rec`` by offset. The file is opened lazily in each process
    (DataLoader workers each get their own descriptor) and read with ``pread``: no shared file position."""

    def __init__(self, path: Path) -> None:
        self.path, self.size = path, path.stat().st_size
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size, "_fd": None, "_pid": -1}

    def _descriptor(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, offset: int, what: str) -> bytes:
        """The record at ``offset``, parts rejoined; ``what`` names it in errors."""
        fd, chunks = self._descriptor(), []
        while True:
            head = os.pread(fd, 8, offset)
            if len(head) < 8:
                raise DataError(f"{self.path}: {what} at byte {offset} runs past the end of the file "
                                f"({self.size} bytes): the .rec is truncated (copy it again) or the .idx belongs "
                                "to another file.")
            magic, word = struct.unpack("<II", head)
            if magic != MAGIC:
                raise DataError(f"{self.path}: {what} at byte {offset} does not start with the RecordIO magic "
                                f"(found {magic:#010x}): the .idx does not match this .rec, or the file is damaged.")
            flag, length = _parts(word)
            data = os.pread(fd, length, offset + 8)
            if len(data) < length:
                raise DataError(f"{self.path}: {what} at byte {offset} needs {length} bytes but the file ends: the "
                                ".rec is truncated (copy it again).")
            chunks.append(data)
            if flag in (0, 3):
                return b"".join(chunks)
            chunks.append(struct.pack("<I", MAGIC))  # the magic the writer took out
            offset += 8 + ((length + 3) & ~3)


def unpack(record: bytes, what: str) -> tuple[np.ndarray, bytes]:
    """(labels, payload) of a record: ``labels`` float32 (one, or the ``flag`` that follow the header)."""
    if len(record) < HEADER.size:
        raise DataError(f"{what} is {len(record)} bytes, shorter than the {HEADER.size}-byte record header.")
    flag, label, _, _ = HEADER.unpack_from(record)
    if flag == 0:
        return np.array([label], np.float32), record[HEADER.size:]
    end = HEADER.size + 4 * flag
    if len(record) < end:
        raise DataError(f"{what} declares {flag} labels but is only {len(record)} bytes long.")
    return np.frombuffer(record, np.float32, flag, HEADER.size).copy(), record[end:]


POWERS_OF_TEN = 10 ** np.arange(19, dtype=np.int64)


def read_index(path: Path, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a ``.idx``, in file order. mxnet's own layout (``%d\\t%d\\n``; CRLF, blank lines and
    a missing last newline taken) is parsed vectorised from a memory map, ``chunk`` bytes at a time (42M lines
    in bounded memory); anything else goes through the text parser, which names a bad line."""
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    mapped = np.memmap(path, np.uint8, mode="r")
    keys, offsets, start = [], [], 0
    while start < size:
        stop = min(start + chunk, size)
        while stop < size:  # end the chunk after its last newline (a longer line widens it)
            newlines = np.flatnonzero(mapped[start:stop] == 10)
            if len(newlines):
                stop = start + int(newlines[-1]) + 1
                break
            stop = min(start + 2 * (stop - start), size)
        parsed = _parse_lines(np.array(mapped[start:stop]))
        if parsed is None:
            return _read_index_text(path)
        keys.append(parsed[0])
        offsets.append(parsed[1])
        start = stop
    return np.concatenate(keys), np.concatenate(offsets)


def _parse_lines(text: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(keys, offsets) of whole ``key\\toffset`` lines (uint8 text), or None if the text is not only such lines."""
    if text[-1] != 10:
        text = np.append(text, np.uint8(10))
    carriage = np.flatnonzero(text == 13)
    if len(carriage):
        if (text[carriage + 1] != 10).any():
            return None
        text = np.delete(text, carriage)
    newline = text == 10
    blank = newline & np.concatenate(([True], newline[:-1]))
    if blank.any():
        text = text[~blank]
    if not len(text):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    digit = (text >= 48) & (text <= 57)
    separators = np.flatnonzero(~digit)
    kinds = text[separators]
    if len(separators) % 2 or (kinds[0::2] != 9).any() or (kinds[1::2] != 10).any():
        return None
    starts = np.concatenate(([0], separators[:-1] + 1))
    widths = separators - starts
    if len(widths) and (widths.min() < 1 or widths.max() > 18):  # an empty field, or past int64
        return None
    exponents = np.repeat(separators, widths) - np.flatnonzero(digit) - 1
    values = (text[digit] - 48).astype(np.int64) * POWERS_OF_TEN[exponents]
    fields = np.add.reduceat(values, starts - np.arange(len(starts)))  # each field's digits, summed
    return fields[0::2].copy(), fields[1::2].copy()


def _read_index_text(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The text parser: any whitespace between fields; a line that is not two integers is named."""
    text = path.read_text()
    try:
        pairs = np.array(text.split(), dtype=np.int64)
        lines = [line for line in text.splitlines() if line.strip()]
        if len(pairs) != 2 * len(lines) or text.count("\t") != len(lines):
            raise ValueError
    except ValueError:
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("\t")
            if line.strip() and not (len(fields) == 2 and all(f.strip().lstrip("-").isdigit() for f in fields)):
                raise DataError(f"{path}, line {number}: {line.strip()!r} is not 'key<TAB>offset': this is not a "
                                "RecordIO index.") from None
        raise DataError(f"{path} is not a RecordIO index.") from None
    return pairs[0::2].copy(), pairs[1::2].copy()


class Index:
    """Offsets by record key, for millions of keys without a Python dict."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, path: Path) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys, self.offsets, self.path = keys[order], offsets[order], path

    def __contains__(self, key: int) -> bool:
        position = int(np.searchsorted(self.keys, key))
        return position < len(self.keys) and int(self.keys[position]) == key

    def offsets_of(self, wanted: np.ndarray) -> np.ndarray:
        positions = np.searchsorted(self.keys, wanted).clip(max=len(self.keys) - 1)
        missing = self.keys[positions] != wanted
        if missing.any():
            raise DataError(f"{self.path} has no offset for record {int(wanted[np.argmax(missing)])} "
                            f"({int(missing.sum())} missing), which record 0 of the .rec lists: the .idx is incomplete "
                            "or belongs to another pack.")
        return self.offsets[positions]

    def __getitem__(self, key: int) -> int:
        return int(self.offsets_of(np.array([key]))[0])


def _image_headers(rec: RecordFile, offsets: np.ndarray, keys: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """The header of every record at ``offsets`` (the records ``keys``), gathered vectorised from a memory map,
    ``chunk`` records at a time (6M headers in seconds, in bounded memory); records split inside their header
    are rejoined."""
    if len(offsets) and int(offsets.max()) + 8 > rec.size:
        bad = int(np.argmax(offsets + 8 > rec.size))
        raise DataError(f"{rec.path}: the .idx points at byte {int(offsets[bad])}, past the end of the file "
                        f"({rec.size} bytes): the .rec is truncated or the .idx belongs to another file.")
    mapped = np.memmap(rec.path, np.uint8, mode="r")
    headers = np.zeros(len(offsets), HEADER_DTYPE)
    for first in range(0, len(offsets), chunk):
        part = offsets[first:first + chunk]
        words = mapped[part[:, None] + np.arange(8)].view("<u4")
        if (words[:, 0] != MAGIC).any():
            bad = int(part[np.argmax(words[:, 0] != MAGIC)])
            raise DataError(f"{rec.path}: the record at byte {bad} does not start with the RecordIO magic: the .idx "
                            "does not match this .rec, or the file is damaged.")
        flags, lengths = words[:, 1] >> 29, words[:, 1] & ((1 << 29) - 1)
        if (part + 8 + lengths > rec.size).any():
            bad = int(part[np.argmax(part + 8 + lengths > rec.size)])
            raise DataError(f"{rec.path}: the record at byte {bad} runs past the end of the file: the .rec is "
                            "truncated (copy it again).")
        short = lengths < HEADER.size
        start = np.where(short, 0, part + 8)
        headers[first:first + chunk] = mapped[start[:, None] + np.arange(HEADER.size)].view(HEADER_DTYPE).reshape(-1)
        for i in np.nonzero(short | (flags == 1))[0]:  # split records: rejoin to read the header exactly
            offset, key = int(part[i]), int(keys[first + i])
            record = rec.read(offset, f"record {key}")
            if len(record) < HEADER.size:
                raise DataError(f"{rec.path}: record {key} (at byte {offset}) is {len(record)} bytes, shorter than "
                                f"the {HEADER.size}-byte image record header: it is not an image record, or the file "
                                "is damaged.")
            headers[first + i] = np.frombuffer(record[:HEADER.size], HEADER_DTYPE)[0]
    return headers


def _identity_keys(rec: RecordFile, offset_of: Index, path: Path) -> tuple[int, int] | None:
    """InsightFace's record 0: ``[first identity record, end)``, or None for a pack without one."""
    if 0 not in offset_of:
        return None
    record = rec.read(offset_of[0], "record 0")
    if HEADER.unpack_from(record)[0] < 2:
        return None
    first, end = (int(v) for v in unpack(record, f"{path} record 0")[0][:2])
    if first >= EXACT_FLOAT:  # float32 rounded it: the first identity record is the one whose range starts at 1
        for key in range(first - 8, first + 9):
            if key in offset_of:
                labels, payload = unpack(rec.read(offset_of[key], f"record {key}"), f"{path} record {key}")
                if len(labels) == 2 and labels[0] == 1 and not payload:
                    return key, int(offset_of.keys[-1]) + 1
        raise DataError(f"{path}: record 0 gives the first identity record as about {first}, past float32's exact "
                        "range, and none near it starts at image 1: the pack is not an InsightFace pack.")
    return first, end


def read_recordio(root: str | None = None, idx: str | None = None, index_cache: str | None = None) -> IdentityData:
    """``root``: the folder holding ``train.rec`` and ``train.idx`` (or a ``.rec`` file); ``idx`` defaults to
    the ``.rec`` with the suffix ``.idx``; ``index_cache``: where the parsed index is kept between starts
    (``auto``, a folder, or None / ``off``: :mod:`doppel.data.index_cache`)."""
    path = require(root, "root", "the folder that holds train.rec and train.idx (or a .rec file)", "faces_emore")
    if path.is_dir():
        path = path / "train.rec"
    idx_path = Path(idx) if idx else path.with_suffix(".idx")
    for file, key in ((path, "root"), (idx_path, "idx")):
        if not file.is_file():
            raise FileNotFoundError(f"data.{key}: {str(file)!r} does not exist; a RecordIO pack is a .rec and its "
                                    ".idx side by side (scripts/pack_recordio.py writes both).")
    rec = RecordFile(path)
    tables = cached_arrays(index_cache, "data.index_cache", [idx_path, path], lambda: _tables(rec, idx_path))
    return IdentityData(labels=torch.from_numpy(tables["labels"]), class_names=[str(c) for c in tables["classes"]],
                        images=RecordImages(rec, tables["offsets"], tables["keys"]), source=str(path))


def _tables(rec: RecordFile, idx_path: Path) -> dict[str, np.ndarray]:
    """What start-up needs of a pack: every image's record key, offset and dense label, and the stored class id
    of each dense label."""
    keys, offsets = read_index(idx_path)
    if len(keys) == 0:
        raise DataError(f"{idx_path} lists no records.")
    offset_of = Index(keys, offsets, idx_path)
    first = _identity_keys(rec, offset_of, rec.path)
    if first is not None:  # InsightFace: images 1 .. first-1, identity records first .. end-1
        image_keys = np.arange(1, first[0], dtype=np.int64)
        identity_keys = np.arange(first[0], first[1], dtype=np.int64)
    else:  # im2rec: every record is an image, in the file's order
        image_keys, identity_keys = keys, np.zeros(0, np.int64)
    del keys, offsets  # the sorted copies in ``offset_of`` are enough from here
    image_offsets = offset_of.offsets_of(image_keys)
    labels = _labels(rec, image_offsets, image_keys, offset_of.offsets_of(identity_keys))
    # A pack of a subset of classes (im2rec of some folders) is renumbered densely, names keep the ids.
    present, labels = np.unique(labels, return_inverse=True)
    return {"keys": image_keys, "offsets": image_offsets, "labels": labels.astype(np.int64), "classes": present}


class RecordImages(EncodedImages):
    def __init__(self, rec: RecordFile, offsets: np.ndarray, keys: np.ndarray) -> None:
        self.rec, self.offsets, self.keys = rec, offsets, keys

    def __getstate__(self) -> dict:  # a spawned worker maps the cache again instead of receiving its bytes
        return {"rec": self.rec, "offsets": mapped_state(self.offsets), "keys": mapped_state(self.keys)}

    def __setstate__(self, state: dict) -> None:
        self.rec, self.offsets, self.keys = state["rec"], *(from_mapped_state(state[k]) for k in ("offsets", "keys"))

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        return f"{self.rec.path} record {int(self.keys[index])}"

    def fetch(self, index: int) -> bytes:
        what = f"record {int(self.keys[index])}"
        return unpack(self.rec.read(int(self.offsets[index]), what), f"{self.rec.path} {what}")[1]


def _labels(rec: RecordFile, image_offsets: np.ndarray, image_keys: np.ndarray,
            identity_offsets: np.ndarray) -> np.ndarray:
    """The stored class of every image (the header's label, or the first label after it), checked against
    the identity records' ranges wherever float32 holds both exactly."""
    headers = _image_headers(rec, image_offsets, image_keys)
    stored = headers["label"].copy()
    for i in np.nonzero(headers["flag"] > 0)[0]:
        stored[i] = unpack(rec.read(int(image_offsets[i]), "image record"), "image record")[0][0]
    wrong = ~np.isfinite(stored) | (stored < 0) | (stored != np.round(stored))
    if wrong.any():
        bad = int(np.argmax(wrong))
        raise DataError(f"{rec.path}: record {int(image_keys[bad])} has label {stored[bad]}, not a class index: "
                        "labels must be whole numbers >= 0.")
    if (stored >= EXACT_FLOAT).any():
        bad = int(np.argmax(stored >= EXACT_FLOAT))
        raise DataError(f"{rec.path}: record {int(image_keys[bad])} has label {stored[bad]:.0f}, at or past 2**24, "
                        "where float32 labels lose whole numbers: its class cannot be read exactly. Renumber the "
                        "classes from 0 and repack (scripts/pack_recordio.py).")
    labels = stored.astype(np.int64)
    first_key = int(image_keys[0]) if len(image_keys) else 0
    for cls, offset in enumerate(identity_offsets.tolist()):
        bounds = unpack(rec.read(offset, f"identity record {cls}"), f"{rec.path} identity record {cls}")[0]
        start, end = (int(b) for b in bounds[:2])
        if end >= EXACT_FLOAT:
            break  # float32 cannot give this range exactly; the images' own labels are checked above
        inside = labels[start - first_key:end - first_key]
        if start < first_key or end - first_key > len(labels) or end <= start or (inside != cls).any():
            raise DataError(f"{rec.path}: identity record {cls} gives images [{start}, {end}) but their labels are "
                            f"{sorted(set(inside.tolist()))[:5]}: the pack's labels and identity records disagree.")
    return labels


# -- writing ---------------------------------------------------------------------------------------
def frame(record: bytes) -> bytes:
    """One record as dmlc-core's RecordIOWriter writes it (split at every aligned magic)."""
    magic = struct.pack("<I", MAGIC)
    out, start = [], 0
    for i in range(0, len(record) - len(record) % 4, 4):
        if record[i:i + 4] == magic:
            out += [magic, struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start)), record[start:i]]
            start = i + 4
    out += [magic, struct.pack("<I", ((3 if start else 0) << 29) | (len(record) - start)), record[start:]]
    out.append(b"\0" * (-len(record) % 4))
    return b"".join(out)


def pack(labels: float | Iterable[float], payload: bytes, record_id: int = 0) -> bytes:
    """A record: the header, then the extra labels when there are several, then the payload."""
    if isinstance(labels, (int, float)):
        return HEADER.pack(0, float(labels), record_id, 0) + payload
    values = np.asarray(list(labels), np.float32)
    return HEADER.pack(len(values), 0.0, record_id, 0) + values.tobytes() + payload


def write_recordio(rec_path: str | Path, classes: Iterable[tuple[int, Iterable[bytes]]]) -> int:
    """Write an InsightFace pack: ``classes`` yields (class, encoded images of it), classes 0, 1, ... in
    order; record 0, then the images, then one identity record per class. Returns the image count."""
    rec_path = Path(rec_path)
    offsets: list[tuple[int, int]] = []
    ranges: list[tuple[int, int]] = []
    with open(rec_path, "wb") as rec:
        provisional = frame(pack([0.0, 0.0], b""))  # record 0, rewritten once the key ranges are known
        offsets.append((0, 0))
        rec.write(provisional)
        key = 1
        for expected, (cls, images) in enumerate(classes):
            if cls != expected:
                raise ValueError(f"classes must come as 0, 1, 2, ...; got {cls} after {expected - 1}.")
            start = key
            for image in images:
                offsets.append((key, rec.tell()))
                rec.write(frame(pack(float(cls), image, key)))
                key += 1
            ranges.append((start, key))
        first = key
        for cls, (start, end) in enumerate(ranges):
            offsets.append((first + cls, rec.tell()))
            rec.write(frame(pack([float(start), float(end)], b"", first + cls)))
        rec.seek(0)
        rec.write(frame(pack([float(first), float(first + len(ranges))], b"")))  # the same size: 2 floats
    with open(rec_path.with_suffix(".idx"), "w") as idx:
        idx.writelines(f"{k}\t{o}\n" for k, o in offsets)
    return first - 1
