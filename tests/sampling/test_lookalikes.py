"""The look-alike diagnostic: known look-alikes in run labels and the share the miner finds."""

import pytest
import torch

from doppel.data.dataset import IdentityData, TensorImages
from doppel.data.split import split_dataset
from doppel.sampling.doppelganger import lookalike_share


def test_share_counts_classes_with_a_doppelganger_and_a_known_lookalike():
    first = torch.tensor([1, -1, 0, 2])  # class 1 has no doppelganger yet
    lookalikes = [{1}, {2}, set(), {0}]  # class 2 has no known look-alike; not symmetric
    share, chance = lookalike_share(first, lookalikes)
    # judged: class 0 (-> 1, a look-alike) and class 3 (-> 2, not one); a random pick: 1 of 3 others each
    assert share == 0.5 and abs(chance - 1 / 3) < 1e-12
    assert lookalike_share(torch.tensor([-1, -1, 0, 2]), [set(), set(), set(), set()]) is None


def data(groups=None, lookalikes=None) -> IdentityData:
    labels = torch.arange(6).repeat_interleave(3)
    return IdentityData(labels=labels, class_names=[f"c{i}" for i in range(6)],
                        images=TensorImages(torch.zeros(18, 3, 2, 2, dtype=torch.uint8)), source="test",
                        groups=groups, lookalikes=lookalikes)


def test_groups_give_lookalikes_unless_every_group_is_one_class():
    assert data(groups=list("aabccc")).known_lookalikes() == [{1}, {0}, set(), {4, 5}, {3, 5}, {3, 4}]
    assert data(groups=list("abcdef")).known_lookalikes() is None
    assert data().known_lookalikes() is None
    given = data(groups=list("aabccc"), lookalikes=[[1, 2], [0], [0], [], [5], [4, 4]])
    assert given.known_lookalikes() == [{1, 2}, {0}, {0}, set(), {5}, {4}]


def test_base_lookalikes_are_in_run_labels_and_leave_novel_classes_out():
    known = [[1, 2, 3], [0], [0, 5], [4], [3], [2]]
    identities = data(groups=[f"g{i}" for i in range(6)], lookalikes=known)
    split = split_dataset(identities, novel_fraction=0.34)
    base = {split.names[label]: label for label in range(split.num_classes)}
    assert 0 < len(base) < 6
    got = split.base_lookalikes(identities)
    for name, label in base.items():
        expected = {base[f"c{o}"] for o in known[int(name[1:])] if f"c{o}" in base}
        assert got[label] == expected


def test_a_run_on_the_cjk_set_logs_the_share_of_its_table_that_are_known_lookalikes(tmp_path):
    """The logged share equals the end-of-epoch table judged against the file's own look-alike array."""
    import csv

    import numpy as np

    from doppel.data.readers.rendered_npz import bundled_path, read_rendered_npz
    from doppel.train import train
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, ["data=cjk", "data.max_groups=120", "trainer.max_epochs=1",
                                 "trainer.limit_train_batches=12"])
    train(cfg)
    with open(tmp_path / "csv" / "metrics.csv") as file:
        logged = next(row for row in csv.DictReader(file) if row.get("doppel/lookalike_share"))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    table = next(v for k, v in checkpoint["callbacks"].items() if "DoppelgangerMining" in k)["table"][:, 0]
    with np.load(bundled_path("cjk32.npz")) as archive:
        file_names = [str(n) for n in archive["identity_name"]]
        nearest = archive["lookalike"]
    split = split_dataset(read_rendered_npz(bundled="cjk32.npz", prototype_vendor="noto_sans"), max_groups=120)
    run_label = {name: label for label, name in enumerate(split.names[:split.num_classes])}
    hits = judged = chance = 0
    for name, label in run_label.items():
        known = {run_label[file_names[j]] for j in nearest[file_names.index(name)] if file_names[j] in run_label}
        if int(table[label]) < 0 or not known:
            continue
        judged += 1
        hits += int(table[label]) in known
        chance += len(known) / (len(run_label) - 1)
    assert judged > 0
    assert float(logged["doppel/lookalike_share"]) == pytest.approx(hits / judged, rel=1e-6)
    assert float(logged["doppel/lookalike_chance"]) == pytest.approx(chance / judged, rel=1e-6)
