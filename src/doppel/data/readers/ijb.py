"""IJB-B / IJB-C as insightface's IJB release lays them out (``IJB_release/IJBC/...``):

- ``meta/<t>_name_5pts_score.txt``: one line per face, ``<image> x1 y1 ... x5 y5 <detector score>``;
- ``meta/<t>_face_tid_mid.txt``: the same faces in the same order, ``<image> <template id> <media id>``;
- ``meta/<t>_template_pair_label.txt``: the 1:1 protocol, ``<template 1> <template 2> <1 genuine | 0 impostor>``;
- ``loose_crop/<image>``: the loosely cropped face images the landmarks are given in;
- 1:N (optional): the official protocol's CSVs ``meta/<t>_1N_gallery_G1.csv`` and ``_G2.csv`` (IJB-B:
  ``_S1`` / ``_S2``) and ``meta/<t>_1N_probe_mixed.csv``, a header line, then ``TEMPLATE_ID,SUBJECT_ID,...``
  per image.

``<t>`` is the target in lower case (``ijbc``, ``ijbb``). Each face is aligned from its five landmarks when
it is loaded (:mod:`doppel.data.align`); nothing is decoded here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from doppel.data.align import align_face
from doppel.data.dataset import CorruptImage, DataError, decode

TARGETS = ("IJBB", "IJBC")
GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}


class AlignedFaces:
    """The faces of the release in file order, each decoded and aligned to ``size`` x ``size`` (uint8
    [3, size, size] RGB). Plain data only, so it pickles into DataLoader workers."""

    def __init__(self, folder: str, names: np.ndarray, landmarks: np.ndarray, size: int = 112) -> None:
        self.folder, self.names, self.landmarks, self.size = folder, names, landmarks, size

    def __len__(self) -> int:
        return len(self.names)

    def path(self, index: int) -> str:
        return f"{self.folder}/{self.names[index]}"

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.path(index)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            raise CorruptImage(f"{path} cannot be read ({error.strerror}): the IJB release's loose_crop folder "
                               "is incomplete; restore the image.", path) from None
        try:
            image = decode(data, path).permute(1, 2, 0).numpy()
        except CorruptImage as error:  # not skippable: every face counts in its template
            raise CorruptImage(f"{str(error).split(': replace')[0]}: restore it from the IJB release (every face "
                               "counts in its template's feature).", path) from None
        return torch.from_numpy(align_face(image, self.landmarks[index], self.size)).permute(2, 0, 1).contiguous()


@dataclass
class Gallery:
    """Templates of a 1:N gallery or probe set (each once, ascending) and their subjects."""

    templates: np.ndarray  # int64
    subjects: np.ndarray  # int64
    half: np.ndarray | None = None  # the two galleries together: which one (0: G1 / S1, 1: G2 / S2) each is from


@dataclass
class IJBRelease:
    target: str  # IJBB or IJBC
    folder: Path
    faces: AlignedFaces
    detector_scores: np.ndarray  # float32 per face
    templates: np.ndarray  # int64 per face
    medias: np.ndarray  # int64 per face
    pairs: np.ndarray  # int64 [P, 2] template ids
    genuine: np.ndarray  # bool [P]
    gallery: Gallery | None  # 1:N: the two galleries together
    probes: Gallery | None

    @property
    def images(self) -> AlignedFaces:  # what the datamodule embeds
        return self.faces


def target_folder(root: str | Path, target: str) -> Path:
    """``root/<target>`` (the release folder), or ``root`` itself when it holds ``meta/`` (the target's folder)."""
    if target not in TARGETS:
        raise ValueError(f"eval.ijb.target={target!r} must be one of {', '.join(TARGETS)}.")
    base = Path(root).expanduser()
    for folder in (base / target, base):
        if (folder / "meta").is_dir():
            return folder
    raise FileNotFoundError(f"eval.ijb.root={str(root)!r} holds neither {target}/meta nor meta/: point it at the "
                            f"folder of insightface's IJB release (the one holding {target}/meta and "
                            f"{target}/loose_crop).")


def _meta(folder: Path, target: str, name: str) -> Path:
    path = folder / "meta" / f"{target.lower()}_{name}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an IJB release has meta/{path.name}; copy the release's meta "
                                "folder whole.")
    return path


def _fields(path: Path, count: int, what: str) -> list[list[str]]:
    """The whitespace-separated fields of every non-empty line, each line ``count`` of them."""
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != count:
                raise DataError(f"{path}, line {number}: {len(fields)} fields where {count} are expected ({what}).")
            rows.append(fields)
    if not rows:
        raise DataError(f"{path} lists nothing; expected lines of {what}.")
    return rows


def _numbers(path: Path, rows: list[list[str]], columns: slice, dtype: type, what: str) -> np.ndarray:
    try:
        return np.array([row[columns] for row in rows], dtype=dtype)
    except ValueError:
        for number, row in enumerate(rows, 1):
            try:
                np.array(row[columns], dtype=dtype)
            except ValueError:
                raise DataError(f"{path}, entry {number}: {' '.join(row)!r} does not hold {what}.") from None
        raise


def read_faces(folder: Path, target: str, size: int = 112) -> tuple[AlignedFaces, np.ndarray, np.ndarray, np.ndarray]:
    """The faces (aligned on access), their detector scores, templates and medias."""
    points_file = _meta(folder, target, "name_5pts_score.txt")
    points = _fields(points_file, 12, "an image name, 5 landmarks as x y pairs, the detector score")
    numbers = _numbers(points_file, points, slice(1, 12), np.float64, "10 landmark coordinates and a score")
    if not np.isfinite(numbers).all():
        bad = int(np.flatnonzero(~np.isfinite(numbers).all(1))[0])
        raise DataError(f"{points_file}, entry {bad + 1}: the landmarks or score of {points[bad][0]} are not finite.")
    membership_file = _meta(folder, target, "face_tid_mid.txt")
    membership = _fields(membership_file, 3, "an image name, its template id, its media id")
    ids = _numbers(membership_file, membership, slice(1, 3), np.int64, "a template id and a media id (integers)")
    names = np.array([row[0] for row in points])
    if len(membership) != len(points) or any(row[0] != name for row, name in zip(membership, names)):
        first = next((i for i, (row, name) in enumerate(zip(membership, names)) if row[0] != name),
                     min(len(membership), len(points)))
        raise DataError(f"{membership_file} and {points_file.name} must list the same images in the same order "
                        f"({len(membership)} vs {len(points)} lines; they first differ at entry {first + 1}): use "
                        "the meta files of one release.")
    crops = folder / "loose_crop"
    if not crops.is_dir():
        raise FileNotFoundError(f"{crops} is missing: the IJB release keeps its face images there.")
    faces = AlignedFaces(str(crops), names, numbers[:, :10].reshape(-1, 5, 2).astype(np.float32), size)
    return faces, numbers[:, 10].astype(np.float32), ids[:, 0], ids[:, 1]


def read_pairs(folder: Path, target: str, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 1:1 template pairs and whether each is genuine; every template must have faces."""
    path = _meta(folder, target, "template_pair_label.txt")
    try:  # numpy's C reader: IJB-C has 15.7M lines
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as error:
        raise DataError(f"{path}: {error}; each line is '<template 1> <template 2> <label 0 or 1>'.") from None
    if table.shape[1] != 3 or len(table) == 0:
        raise DataError(f"{path}: {table.shape[1]} columns where each line is '<template 1> <template 2> <label>'.")
    labels = table[:, 2]
    if not np.isin(labels, (0, 1)).all():
        line = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0]) + 1
        raise DataError(f"{path}, line {line}: the label {int(labels[line - 1])} is neither 1 (genuine) nor 0.")
    if labels.min() == labels.max():
        kind = "genuine" if labels[0] else "impostor"
        raise DataError(f"{path}: all {len(labels)} pairs are {kind}; TAR at FAR needs both kinds of pairs.")
    pairs = table[:, :2]
    _require_templates(pairs.reshape(-1), templates, path, lambda i: f"line {i // 2 + 1}")
    return pairs, labels.astype(bool)


def _require_templates(wanted: np.ndarray, templates: np.ndarray, path: Path, where) -> None:
    known = np.unique(templates)
    missing = ~np.isin(wanted, known)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise DataError(f"{path}, {where(first)}: template {int(wanted[first])} has no face in "
                        f"{target_name(path)}_face_tid_mid.txt ({int(missing.sum())} such references): the meta "
                        "files come from different releases.")


def target_name(path: Path) -> str:
    return path.name.split("_")[0]


def read_template_subjects(path: Path, templates: np.ndarray) -> Gallery:
    """A 1:N CSV (a header, then ``TEMPLATE_ID,SUBJECT_ID,...`` per image): each template once, with its subject."""
    with open(path, encoding="utf-8", newline="") as file:
        rows = [row for row in csv.reader(file) if row]
    if len(rows) < 2:
        raise DataError(f"{path} lists no template; expected a header line, then TEMPLATE_ID,SUBJECT_ID,... lines.")
    try:
        pairs = np.array([(int(row[0]), int(row[1])) for row in rows[1:]], dtype=np.int64)
    except (ValueError, IndexError):
        line = next(i for i, row in enumerate(rows[1:], 2) if len(row) < 2 or not _integers(row[:2]))
        raise DataError(f"{path}, line {line}: {','.join(rows[line - 1])!r} does not start with a template id and "
                        "a subject id.") from None
    unique, first = np.unique(pairs[:, 0], return_index=True)
    subjects = pairs[first, 1]
    mixed = pairs[:, 1] != subjects[np.searchsorted(unique, pairs[:, 0])]
    if mixed.any():
        line = int(np.flatnonzero(mixed)[0]) + 2
        raise DataError(f"{path}, line {line}: template {int(pairs[line - 2, 0])} is given two subjects.")
    _require_templates(unique, templates, path, lambda i: f"template {int(unique[i])}")
    return Gallery(unique, subjects)


def _integers(values: list[str]) -> bool:
    try:
        [int(v) for v in values]
        return True
    except ValueError:
        return False


def read_identification(folder: Path, target: str, templates: np.ndarray) -> tuple[Gallery, Gallery] | None:
    """The 1:N gallery (both halves) and probes, or None when the release has none of their CSVs."""
    names = [f"1N_gallery_{g}.csv" for g in GALLERIES[target]] + ["1N_probe_mixed.csv"]
    present = [(folder / "meta" / f"{target.lower()}_{name}").is_file() for name in names]
    if not any(present):
        return None
    halves = [read_template_subjects(_meta(folder, target, name), templates) for name in names[:2]]
    probes = read_template_subjects(_meta(folder, target, names[2]), templates)
    gallery = Gallery(np.concatenate([h.templates for h in halves]), np.concatenate([h.subjects for h in halves]),
                      np.concatenate([np.full(len(h.templates), i) for i, h in enumerate(halves)]))
    order = np.argsort(gallery.templates, kind="stable")
    gallery = Gallery(gallery.templates[order], gallery.subjects[order], gallery.half[order])
    _, counts = np.unique(gallery.subjects, return_counts=True)
    if len(np.unique(gallery.templates)) != len(gallery.templates) or (counts > 1).any():
        raise DataError(f"{folder / 'meta'}: the 1:N galleries must hold one template per subject, each in one "
                        "gallery; a template or subject appears twice.")
    absent = ~np.isin(probes.subjects, gallery.subjects)
    if absent.any():
        raise DataError(f"{_meta(folder, target, names[2])}: subject {int(probes.subjects[absent][0])} (template "
                        f"{int(probes.templates[absent][0])}) has no template in the galleries "
                        f"{' + '.join(names[:2])}; insightface's 1:N search needs every probe's mate in them.")
    return gallery, probes


def read_ijb(root: str | Path, target: str, identification: bool | None = None, size: int = 112) -> IJBRelease:
    """The release under ``root`` for ``target``; ``identification``: None reads the 1:N CSVs when present,
    True requires them, False skips them."""
    folder = target_folder(root, target)
    faces, scores, templates, medias = read_faces(folder, target, size)
    pairs, genuine = read_pairs(folder, target, templates)
    search = None
    if identification is not False:
        search = read_identification(folder, target, templates)
        if search is None and identification:
            raise FileNotFoundError(f"eval.ijb.identification=true and {folder / 'meta'} has no "
                                    f"{target.lower()}_1N_probe_mixed.csv (nor its galleries): copy the 1:N meta "
                                    "files of the release there, or set eval.ijb.identification=auto.")
    gallery, probes = search if search is not None else (None, None)
    return IJBRelease(target, folder, faces, scores, templates, medias, pairs, genuine, gallery, probes)
