"""An image folder: ``root/<class>/<image>`` (``data=folder``), the layout of aligned face sets and of
torchvision's ImageFolder. Classes in name order (or the order of ``class_list``), images in name order."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from doppel.data.dataset import DataError, FileImages, IdentityData, require

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def image_files(folder: Path) -> list[str]:
    """Image files directly in ``folder`` by name (hidden files and other suffixes are not images)."""
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries
                      if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(EXTENSIONS))


def read_folder(root: str | None = None, class_list: str | None = None) -> IdentityData:
    """``class_list``: a text file of class folder names, one per line: only those, in that order."""
    root = require(root, "root", "a folder with one sub-folder of images per class", "images")
    if class_list is not None:
        listed = require(class_list, "class_list", "a text file with one class folder name per line")
        classes = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        first_line: dict[str, int] = {}
        for number, line in enumerate(listed.read_text().splitlines(), 1):
            name = os.path.normpath(line.strip()) if line.strip() else None
            if name in first_line:  # one folder twice would be two classes of the same images
                raise DataError(f"{listed}, line {number}: {line.strip()!r} is listed again (first on line "
                                f"{first_line[name]}); list each class folder once.")
            if name is not None:
                first_line[name] = number
        missing = [c for c in classes if not (root / c).is_dir()]
        if missing:
            raise DataError(f"{listed} lists {missing[:3]}, which are not folders of {root} ({len(missing)} missing).")
    else:
        with os.scandir(root) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"data.root={str(root)!r} has no class folders: the layout is root/<class>/<image>.")
    for name in classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # the file system's bytes, undecodable: Python keeps them as surrogates
            raise DataError(f"{root}: the class folder {os.fsencode(name)!r} is not named in UTF-8 (another "
                            "encoding, e.g. Latin-1 or GBK): rename it in UTF-8 (convmv -f <encoding> -t utf-8)."
                            ) from None
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        if not files:
            raise DataError(f"{root / name} holds no images ({', '.join(EXTENSIONS)}): remove the empty class folder "
                            "or list the classes to use in data.class_list.")
        paths += files
        labels += [label] * len(files)
    return IdentityData(labels=torch.tensor(labels), class_names=classes, images=FileImages(paths), source=str(root))
