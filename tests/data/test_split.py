"""The split against a naive loop over classes and images written from its rules (the implementation before
it was vectorised), on random datasets with groups, preferred prototypes, max_groups and base queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from doppel.data.dataset import DataError, IdentityData, Part, TensorImages
from doppel.data.split import split_dataset
from doppel.seeding import stable_fraction


def naive_split(data: IdentityData, novel_fraction: float, max_groups: int | None, base_queries: bool):
    """(rows, run labels, parts, names, number of base classes), one class and one image at a time."""
    groups = data.groups if data.groups is not None else data.keys
    kept = sorted(set(groups), key=lambda g: stable_fraction("pick:" + g))
    kept = set(kept[:max_groups] if max_groups is not None else kept)
    novel_groups = {g for g in kept if stable_fraction(g) < novel_fraction}
    images_of: dict[int, list[int]] = {}
    for image, cls in enumerate(data.labels.tolist()):
        if groups[cls] in kept:
            images_of.setdefault(cls, []).append(image)
    preferred = data.prototype_preference
    base, novel = [], []
    for cls, images in sorted(images_of.items()):
        if len(images) < 2:
            continue
        is_novel = groups[cls] in novel_groups
        if is_novel and preferred is not None and not preferred[images].any():
            continue
        (novel if is_novel else base).append(cls)
    rows, parts = [], []
    for cls in base:
        images = images_of[cls]
        held = images[int(stable_fraction(data.keys[cls]) * len(images))] if base_queries and len(images) >= 3 else None
        rows += images
        parts += [Part.HELD_OUT if i == held else Part.TRAIN for i in images]
    for cls in novel:
        images = images_of[cls]
        proto = next(i for i in images if preferred[i]) if preferred is not None else images[0]
        rows += images
        parts += [Part.REFERENCE if i == proto else Part.QUERY for i in images]
    run_label: dict[int, int] = {}
    for image in rows:
        run_label.setdefault(int(data.labels[image]), len(run_label))
    labels = [run_label[int(data.labels[image])] for image in rows]
    return rows, labels, [int(p) for p in parts], [data.class_names[c] for c in run_label], len(base)


def random_data(seed: int, grouped: bool, with_preferred: bool, keyed: bool, scattered: bool) -> IdentityData:
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(30, 80))
    sizes = rng.integers(1, 7, classes)  # classes of 1 image are dropped, of 2 have no base query
    labels = np.repeat(np.arange(classes), sizes)  # class by class, as a RecordIO pack holds them
    if scattered:  # as a folder of shuffled files may
        labels = rng.permutation(labels)
    names = [f"id{c:03d}" for c in range(classes)]
    preferred = torch.from_numpy(rng.random(len(labels)) < 0.3) if with_preferred else None
    return IdentityData(labels=torch.from_numpy(labels), class_names=names,
                        images=TensorImages(torch.zeros(len(labels), 3, 1, 1, dtype=torch.uint8)), source="random",
                        groups=[f"g{c // 3}" for c in range(classes)] if grouped else None,
                        class_keys=[f"key{c}" for c in range(classes)] if keyed else None,
                        prototype_preference=preferred)


@pytest.mark.parametrize("scattered", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_split_matches_the_naive_loop(seed: int, scattered: bool) -> None:
    rng = np.random.default_rng(100 + seed)
    data = random_data(seed, grouped=seed % 2 == 0, with_preferred=seed % 2 == 1, keyed=seed % 4 == 1,
                       scattered=scattered)
    novel_fraction = [0.0, 0.3, 0.5][seed % 3]
    max_groups = None if seed % 5 < 2 else int(rng.integers(8, 20))
    base_queries = seed % 4 != 3
    rows, labels, parts, names, base = naive_split(data, novel_fraction, max_groups, base_queries)
    if base < 2 or (novel_fraction > 0 and len(names) == base):
        with pytest.raises(DataError, match="base and"):
            split_dataset(data, novel_fraction, max_groups, base_queries)
        return
    split = split_dataset(data, novel_fraction, max_groups, base_queries)
    assert split.index.tolist() == rows
    assert split.label.tolist() == labels
    assert split.part.tolist() == parts
    assert split.names == names and split.num_classes == base
