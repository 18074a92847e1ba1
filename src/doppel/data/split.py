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

import torch

from doppel.data.dataset import DataError, IdentityData, Part, in_parts
from doppel.seeding import stable_fraction


@dataclass
class Split:
    index: torch.Tensor  # long [M], images of the dataset in the run
    label: torch.Tensor  # long [M], the run's class of each
    part: torch.Tensor  # long [M], values of Part
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


def check_novel_fraction(novel_fraction: float) -> None:
    if not 0 <= novel_fraction < 1:
        raise ValueError(f"data.novel_fraction={novel_fraction} must be in [0, 1) (0: every class is trained on).")


def split_dataset(data: IdentityData, novel_fraction: float = 0.2, max_groups: int | None = None,
                  base_queries: bool = True) -> Split:
    groups = data.groups if data.groups is not None else data.keys
    kept = sorted(set(groups), key=lambda g: stable_fraction("pick:" + g))
    if max_groups is not None:
        kept = kept[:max_groups]
    kept_groups = set(kept)
    if data.parts is not None:
        return _given_split(data, torch.tensor([g in kept_groups for g in groups]))
    check_novel_fraction(novel_fraction)
    novel_groups = {g for g in kept if stable_fraction(g) < novel_fraction}

    images_of: dict[int, list[int]] = {}
    for image, cls in enumerate(data.labels.tolist()):
        if groups[cls] in kept_groups:
            images_of.setdefault(cls, []).append(image)
    preferred = data.prototype_preference
    base, novel = [], []
    for cls, images in sorted(images_of.items()):
        if len(images) < 2:
            continue  # a class with one image can be neither trained on with pairs nor queried
        is_novel = groups[cls] in novel_groups
        if is_novel and preferred is not None and not preferred[images].any():
            continue
        (novel if is_novel else base).append(cls)
    if len(base) < 2 or (novel_fraction > 0 and not novel):
        raise DataError(f"{data.source}: the split has {len(base)} base and {len(novel)} novel classes; raise "
                        f"data.max_groups or change data.novel_fraction.")

    rows, parts = [], []
    for cls in base:
        images = images_of[cls]
        held_out = images[int(stable_fraction(data.keys[cls]) * len(images))] \
            if base_queries and len(images) >= 3 else None
        rows += images
        parts += [Part.HELD_OUT if image == held_out else Part.TRAIN for image in images]
    for cls in novel:
        images = images_of[cls]
        proto = next(i for i in images if preferred[i]) if preferred is not None else images[0]
        rows += images
        parts += [Part.REFERENCE if image == proto else Part.QUERY for image in images]
    return _relabelled(data, torch.tensor(rows, dtype=torch.long), torch.tensor([int(r) for r in parts]), len(base))


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
    classes = data.labels[rows]
    order: dict[int, int] = {}
    for cls in classes.tolist():
        order.setdefault(cls, len(order))
    lookup = torch.full((len(data.class_names),), -1, dtype=torch.long)
    lookup[torch.tensor(list(order))] = torch.arange(len(order))
    names = [data.class_names[cls] for cls in order]
    return Split(index=rows, label=lookup[classes], part=parts, names=names, num_classes=num_base,
                 references_given=references_given)
