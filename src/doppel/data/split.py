"""The run's split of a dataset: which images are trained on and what every other image is for.

Two ways, both deterministic and independent of the machine:

- the format's own split (:attr:`IdentityData.parts`: CUB's test classes, In-Shop's query / gallery,
  a CSV's ``split`` / ``role`` columns), taken as it is;
- otherwise held-out (novel) classes are whole groups chosen by a hash of the group key
  (``novel_fraction``); a novel class's preferred (else first) image is its one-shot prototype and its
  other images are queries; a base class with 3 or more images keeps one (chosen by hash) out of
  training as its query (``base_queries``).

Either way ``max_groups`` keeps a subset of the groups (chosen by hash) for quick runs.

Base classes are labelled 0..num_classes-1 (the classifier's size), novel ones num_classes and up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from doppel.data.dataset import DataError, IdentityData, Part, in_parts
from doppel.seeding import stable_fractions


@dataclass
class Split:
    index: torch.Tensor  # long [M], images of the dataset in the run
    label: torch.Tensor  # long [M], the run's class of each
    part: torch.Tensor  # [M], values of Part (int8 when the split decides)
    names: list[str]  # per run label
    num_classes: int  # base classes = classifier size
    references_given: bool = False  # the files name the test classes' references (In-Shop's gallery)

    @property
    def training(self) -> torch.Tensor:
        """Positions in this split of the images the network trains on."""
        return self.positions({Part.TRAIN})

    def positions(self, parts: set[Part] | set[int]) -> torch.Tensor:
        """Positions in this split (ascending) of the images in any of ``parts``."""
        return torch.nonzero(in_parts(self.part, parts)).flatten()

    def base_lookalikes(self, data: IdentityData) -> list[set[int]] | None:
        """Per base class (run label), the base classes the data knows look like it (None: it knows none)."""
        known = data.known_lookalikes()
        if known is None:
            return None
        run_label = {int(cls): int(label) for cls, label in zip(data.labels[self.index], self.label)}
        base = {cls: label for cls, label in run_label.items() if label < self.num_classes}
        lookalikes: list[set[int]] = [set() for _ in range(self.num_classes)]
        for cls, label in base.items():
            lookalikes[label] = {base[other] for other in known[cls] if other in base}
        return lookalikes


def take(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``values[positions]``: a view when the positions are ascending and contiguous (the training images of a
    split usually are: 42M of them would otherwise be copied per process), else a copy."""
    if len(positions) and int(positions[-1]) - int(positions[0]) == len(positions) - 1 \
            and bool((positions[1:] > positions[:-1]).all()):
        return values[int(positions[0]):int(positions[-1]) + 1]
    return values[positions]


def check_novel_fraction(novel_fraction: float) -> None:
    if not 0 <= novel_fraction < 1:
        raise ValueError(f"data.novel_fraction={novel_fraction} must be in [0, 1) (0: every class is trained on).")


def split_dataset(data: IdentityData, novel_fraction: float = 0.2, max_groups: int | None = None,
                  base_queries: bool = True) -> Split:
    # Vectorised over images and classes (WebFace42M: 42M images, 2M classes in seconds); the only Python
    # loops are over the group keys (a dict and one hash each).
    groups = data.groups if data.groups is not None else data.keys
    if len(set(groups)) == len(groups):  # a group per class (the usual case: a class's own key)
        group_of_class, unique_groups = np.arange(len(groups)), list(groups)
    else:
        group_ids: dict[str, int] = {}
        group_of_class = np.array([group_ids.setdefault(g, len(group_ids)) for g in groups], np.int64)
        unique_groups = list(group_ids)
    kept_group = np.ones(len(unique_groups), bool)
    if max_groups is not None:
        pick = stable_fractions("pick:" + g for g in unique_groups)
        kept_group[:] = False
        kept_group[np.argsort(pick, kind="stable")[:max_groups]] = True
    if data.parts is not None:
        return _given_split(data, torch.from_numpy(kept_group[group_of_class]))
    check_novel_fraction(novel_fraction)
    group_fraction = stable_fractions(unique_groups)
    novel_class = (group_fraction < novel_fraction)[group_of_class]

    labels = data.labels.numpy()
    # images class by class, ascending within a class (None: the labels already are, as in a RecordIO pack)
    order = None if bool((labels[1:] >= labels[:-1]).all()) else np.argsort(labels, kind="stable")
    count = np.bincount(labels, minlength=len(groups))
    first = np.cumsum(count) - count  # where each class starts in that order
    eligible = kept_group[group_of_class] & (count >= 2)  # one image: no pairs to train on, nothing to query
    preferred = data.prototype_preference.numpy().astype(bool) if data.prototype_preference is not None else None
    if preferred is not None:  # a novel class needs a preferred image to be its prototype
        eligible &= ~novel_class | (np.bincount(labels[preferred], minlength=len(groups)) > 0)
    base, novel = np.flatnonzero(eligible & ~novel_class), np.flatnonzero(eligible & novel_class)
    if len(base) < 2 or (novel_fraction > 0 and not len(novel)):
        raise DataError(f"{data.source}: the split has {len(base)} base and {len(novel)} novel classes; raise "
                        f"data.max_groups or change data.novel_fraction.")

    def images_of(classes: np.ndarray) -> np.ndarray:
        """The images of ``classes`` (ascending), class by class."""
        member = np.zeros(len(groups), bool)
        member[classes] = True
        return np.flatnonzero(member[labels]) if order is None else order[member[labels[order]]]

    rows = np.concatenate([images_of(base), images_of(novel)])
    parts = np.full(len(rows), int(Part.TRAIN), np.int8)
    if base_queries:  # one image of each base class with 3+ images, at a position fixed by the class key
        queried = base[count[base] >= 3]
        fraction = group_fraction[group_of_class[queried]] if data.groups is None else \
            stable_fractions(data.keys[c] for c in queried.tolist())
        held_out = first[queried] + np.floor(fraction * count[queried]).astype(np.int64)
        is_held_out = np.zeros(len(labels), bool)
        is_held_out[held_out if order is None else order[held_out]] = True
        parts[is_held_out[rows]] = Part.HELD_OUT
    novel_rows = rows[len(rows) - int(count[novel].sum()):]
    novel_parts = parts[len(rows) - len(novel_rows):]
    novel_parts[:] = Part.QUERY
    novel_labels = labels[novel_rows]
    candidates = np.flatnonzero(preferred[novel_rows]) if preferred is not None else np.arange(len(novel_rows))
    # the first candidate of each class (rows are grouped by class): the one-shot prototype
    novel_parts[candidates[np.unique(novel_labels[candidates], return_index=True)[1]]] = Part.REFERENCE
    # run labels: base classes 0.. in ascending class order, then the novel ones (the order of ``rows``)
    in_order = np.concatenate([base, novel])
    lookup = np.full(len(groups), -1, np.int64)
    lookup[in_order] = np.arange(len(in_order))
    return Split(index=torch.from_numpy(rows), label=torch.from_numpy(lookup[labels[rows]]),
                 part=torch.from_numpy(parts), names=[data.class_names[c] for c in in_order.tolist()],
                 num_classes=len(base))


def _given_split(data: IdentityData, kept_class: torch.Tensor) -> Split:
    given_references = bool((data.parts == Part.REFERENCE).any())
    parts = data.parts.clone()
    used = (parts != Part.UNUSED) & kept_class[data.labels]
    training = used & (parts == Part.TRAIN)
    base_classes = torch.unique(data.labels[training])
    if len(base_classes) < 2:
        raise DataError(f"{data.source}: the split trains on {len(base_classes)} classes; it needs at least 2.")
    is_base = torch.zeros(len(data.class_names), dtype=torch.bool)
    is_base[base_classes] = True
    base_image = is_base[data.labels]
    wrong = used & ~base_image & (parts == Part.HELD_OUT)
    if wrong.any():
        first = int(torch.nonzero(wrong)[0])
        raise DataError(f"{data.source}: image {first} is a base query of class "
                        f"{data.class_names[int(data.labels[first])]!r}, which has no training images.")
    wrong = used & base_image & ((parts == Part.REFERENCE) | (parts == Part.QUERY) | (parts == Part.TEST_CLASS))
    if wrong.any():
        first = int(torch.nonzero(wrong)[0])
        raise DataError(f"{data.source}: image {first} is a held-out (test) image of class "
                        f"{data.class_names[int(data.labels[first])]!r}, which is also trained on: a test class "
                        "must have no training images.")
    # A held-out class without a stated prototype takes its first image as one; other unstated images are queries.
    first_seen = set(data.labels[parts == Part.REFERENCE].tolist())  # classes with a stated prototype
    for image in torch.nonzero(parts == Part.TEST_CLASS).flatten().tolist():
        cls = int(data.labels[image])
        parts[image] = Part.QUERY if cls in first_seen else Part.REFERENCE
        first_seen.add(cls)
    rows = torch.nonzero(used & base_image).flatten()
    rows = torch.cat([rows[torch.argsort(data.labels[rows], stable=True)], torch.nonzero(used & ~base_image).flatten()])
    return _relabelled(data, rows, parts[rows], len(base_classes), given_references)


def _relabelled(data: IdentityData, rows: torch.Tensor, parts: torch.Tensor, num_base: int,
                references_given: bool = False) -> Split:
    """Base classes first, each class's run label in order of first appearance in ``rows``."""
    classes = data.labels[rows].numpy()
    present, first_row = np.unique(classes, return_index=True)
    in_order = present[np.argsort(first_row)]
    lookup = np.full(len(data.class_names), -1, np.int64)
    lookup[in_order] = np.arange(len(in_order))
    names = [data.class_names[cls] for cls in in_order.tolist()]
    return Split(index=rows, label=torch.from_numpy(lookup[classes]), part=parts, names=names, num_classes=num_base,
                 references_given=references_given)
