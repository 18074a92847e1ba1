"""A CSV / TSV manifest (``data=csv``): the simplest way to describe any dataset and any split.

The first line names the columns; ``path`` and ``label`` are required, ``split`` and ``role`` optional:

    path,label,split,role
    alice/001.jpg,alice,train,
    alice/002.jpg,alice,train,query
    carol/001.jpg,carol,test,prototype
    carol/002.jpg,carol,test,query

Paths are relative to the manifest's folder (or absolute). ``label`` is any class name. ``split``:
``train`` (trained on; role ``query`` keeps the image out of training as a base query) or ``test`` (a
held-out class; role ``prototype`` / ``gallery`` for reference images, ``query`` for queries, empty for
the first image as prototype and the others as queries). Without a ``split`` column the DataModule
splits by hash (``data.novel_fraction``); a ``role`` column needs a ``split`` column. A ``.tsv`` is
tab-separated.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path

import torch

from doppel.data.dataset import DataError, FileImages, IdentityData, Part, require

ROLES = {("train", ""): Part.TRAIN, ("train", "query"): Part.HELD_OUT, ("test", ""): Part.TEST_CLASS,
         ("test", "prototype"): Part.REFERENCE, ("test", "gallery"): Part.REFERENCE,
         ("test", "query"): Part.QUERY}


def _class_order(names: set[str]) -> list[str]:
    """Whole numbers (ASCII digits) in numeric order, other names alphabetically."""
    if all(re.fullmatch(r"-?[0-9]+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def read_csv(path: str | None = None, drop_duplicates: bool = False) -> IdentityData:
    """``drop_duplicates``: a path listed again under the same label is dropped (and counted) instead of an
    error; under another label it is always an error."""
    path = require(path, "path", "a CSV / TSV file with a header line: path,label[,split][,role]")
    try:
        return _read(path, drop_duplicates)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}): "
                        "save it as UTF-8 (Excel: 'CSV UTF-8'; a byte order mark is fine).") from None


def _read(path: Path, drop_duplicates: bool) -> IdentityData:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    first_seen: dict[str, tuple[int, str]] = {}  # image path -> (line, label)
    dropped = 0
    with open(path, newline="", encoding="utf-8-sig") as file:
        rows = csv.reader(file, delimiter=delimiter)
        header = [h.strip().lower() for h in next(rows, [])]
        for column in ("path", "label"):
            if column not in header:
                raise DataError(f"{path}: the first line {header} has no {column!r} column; it must name the columns, "
                                "e.g. path,label,split,role.")
        unknown = set(header) - {"path", "label", "split", "role"}
        if unknown:
            raise DataError(f"{path}: unknown columns {sorted(unknown)}; the columns are path, label, split, role.")
        if "role" in header and "split" not in header:
            raise DataError(f"{path}: a role column without a split column; roles are given within a split the file "
                            "states (train / test): add a split column, or drop the role column to split by hash "
                            "(data.novel_fraction).")
        column = {name: header.index(name) for name in header}
        paths, names, roles = [], [], []
        for number, row in enumerate(rows, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < len(header):
                raise DataError(f"{path}, line {number}: {len(row)} fields for the {len(header)} columns {header}.")
            cell = {name: row[i].strip() for name, i in column.items()}
            if not cell["path"] or not cell["label"]:
                raise DataError(f"{path}, line {number}: empty path or label.")
            key = (cell.get("split", "train").lower() or "train", cell.get("role", "").lower())
            if key not in ROLES:
                raise DataError(f"{path}, line {number}: split={key[0]!r} role={key[1]!r} is not a known combination: "
                                "split is train or test; role is empty or query (train), prototype, gallery or "
                                "query (test).")
            image = os.path.normpath(path.parent / cell["path"])
            if image in first_seen:
                line, label = first_seen[image]
                if label != cell["label"]:
                    raise DataError(f"{path}, line {number}: {cell['path']} is labelled {cell['label']!r} here and "
                                    f"{label!r} on line {line}: an image has one label; correct one of the lines.")
                if not drop_duplicates:
                    raise DataError(f"{path}, line {number}: {cell['path']} is listed again (first on line {line}): "
                                    "a repeated image would be trained on and tested on at once; remove the "
                                    "repeats, or set data.drop_duplicates=true to drop them.")
                dropped += 1
                continue
            first_seen[image] = (number, cell["label"])
            paths.append(image)
            names.append(cell["label"])
            roles.append(int(ROLES[key]))
    if not paths:
        raise DataError(f"{path} lists no images.")
    if dropped:
        warnings.warn(f"data.drop_duplicates: {path}: dropped {dropped} repeated lines.", stacklevel=2)
    classes = _class_order(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return IdentityData(labels=torch.tensor([index[n] for n in names]), class_names=classes, images=FileImages(paths),
                        source=str(path), parts=torch.tensor(roles) if "split" in column else None)
