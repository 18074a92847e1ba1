"""The deep metric learning benchmarks, read from their original archives' layout: the first half of the
classes trains, the second half is held out (every held-out image is a query against all others of the
test set, so ``novel/recall@1`` is the benchmark's Recall@1; In-Shop: queries against its gallery).

- CUB-200-2011 (``data=cub``): ``images.txt`` (id, path under images/), ``image_class_labels.txt``
  (id, class 1-200), ``classes.txt``; classes 1-100 train, 101-200 test.
- Cars196 (``data=cars``): ``cars_annos.mat`` (``annotations``: relative_im_path, class 1-196;
  ``class_names``); classes 1-98 train, 99-196 test.
- Stanford Online Products (``data=sop``): ``Ebay_train.txt`` / ``Ebay_test.txt`` (image_id class_id
  super_class_id path); the super-classes are the groups.
- In-Shop Clothes (``data=inshop``): ``list_eval_partition.txt`` (a count line, a header line, then
  image_name item_id evaluation_status in train / query / gallery).
"""

from __future__ import annotations

from pathlib import Path

import torch

from doppel.data.dataset import DataError, FileImages, IdentityData, Part, require


def _lines(path: Path, fields: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: data.root must be the benchmark's extracted folder.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines()[skip:], skip + 1):
        if line.strip():
            parts = line.split()
            if len(parts) < fields:
                raise DataError(f"{path}, line {number}: {line!r} has {len(parts)} fields, {fields} expected.")
            rows.append((number, parts))
    return rows


def _dataset(benchmark: str, root: Path, paths: list[str], class_ids: list[str], train_ids: set[str],
             names: dict[str, str] | None, groups: dict[str, str] | None = None,
             parts: list[int] | None = None) -> IdentityData:
    order = sorted(set(class_ids), key=lambda c: (c not in train_ids, int(c) if c.isdigit() else c))
    index = {c: i for i, c in enumerate(order)}
    if parts is None:
        parts = [int(Part.TRAIN) if c in train_ids else int(Part.TEST_CLASS) for c in class_ids]
    return IdentityData(labels=torch.tensor([index[c] for c in class_ids]),
                        class_names=[names.get(c, c) if names else c for c in order],
                        images=FileImages([str(root / p) for p in paths]), source=str(root),
                        groups=[groups[c] for c in order] if groups else None, parts=torch.tensor(parts),
                        benchmark=benchmark)


def read_cub(root: str | None = None) -> IdentityData:
    root = require(root, "root", "the extracted CUB_200_2011 folder", "CUB_200_2011")
    paths = {p[0]: p[1] for _, p in _lines(root / "images.txt", 2)}
    labels = {p[0]: p[1] for _, p in _lines(root / "image_class_labels.txt", 2)}
    names = {p[0]: p[1] for _, p in _lines(root / "classes.txt", 2)} if (root / "classes.txt").is_file() else None
    missing = sorted(set(paths) - set(labels), key=int)
    if missing:
        raise DataError(f"{root / 'image_class_labels.txt'} has no class for image {missing[0]} of images.txt.")
    ids = sorted(paths, key=int)
    classes = [labels[i] for i in ids]
    return _dataset("cub", root, ["images/" + paths[i] for i in ids], classes, {str(c) for c in range(1, 101)}, names)


def read_cars(root: str | None = None) -> IdentityData:
    from scipy.io import loadmat  # MATLAB v5 files; reading one runs no code

    root = require(root, "root", "the extracted Cars196 folder (cars_annos.mat and car_ims/)", "cars196")
    path = root / "cars_annos.mat"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: data.root must hold cars_annos.mat and car_ims/.")
    mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    if "annotations" not in mat:
        raise DataError(f"{path} has no 'annotations': not the Cars196 annotation file.")
    annotations = mat["annotations"]
    annotations = annotations if hasattr(annotations, "__len__") else [annotations]
    paths = [str(a.relative_im_path) for a in annotations]
    classes = [str(int(a.__dict__["class"])) for a in annotations]
    names = {str(i + 1): str(n) for i, n in enumerate(mat.get("class_names", []))}
    return _dataset("cars", root, paths, classes, {str(c) for c in range(1, 99)}, names)


def read_sop(root: str | None = None) -> IdentityData:
    root = require(root, "root", "the extracted Stanford_Online_Products folder", "Stanford_Online_Products")
    paths, classes, groups, train = [], [], {}, set()
    for name, is_train in (("Ebay_train.txt", True), ("Ebay_test.txt", False)):
        for _, (_, class_id, super_id, relative) in ((n, p[:4]) for n, p in _lines(root / name, 4, skip=1)):
            paths.append(relative)
            classes.append(class_id)
            groups[class_id] = super_id
            if is_train:
                train.add(class_id)
    return _dataset("sop", root, paths, classes, train, None, groups)


def read_inshop(root: str | None = None) -> IdentityData:
    root = require(root, "root", "the extracted In-shop Clothes folder (list_eval_partition.txt and img/)", "inshop")
    rows = _lines(root / "list_eval_partition.txt", 3, skip=2)
    status_role = {"train": int(Part.TRAIN), "query": int(Part.QUERY),
                   "gallery": int(Part.REFERENCE)}
    paths, classes, roles = [], [], []
    for number, (image, item, status) in ((n, p[:3]) for n, p in rows):
        if status not in status_role:
            raise DataError(f"{root / 'list_eval_partition.txt'}, line {number}: status {status!r} is not train, "
                            "query or gallery.")
        paths.append(image)
        classes.append(item)
        roles.append(status_role[status])
    train = {c for c, r in zip(classes, roles) if r == Part.TRAIN}
    return _dataset("inshop", root, paths, classes, train, None, parts=roles)
