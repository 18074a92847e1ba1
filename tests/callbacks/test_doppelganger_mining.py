"""The mining callback's per-epoch table metrics, against values counted by hand."""

from types import SimpleNamespace

import pytest

from doppel.callbacks.doppelganger_mining import DoppelgangerMining
from doppel.sampling.doppelganger import EMPTY, DoppelgangerTable


def test_epoch_metrics_count_churn_fill_and_hub_by_hand():
    table = DoppelgangerTable(num_classes=5, top_k=2)
    # Second doppelgangers all 4 and unchanged: only the first column may count.
    table.table[:] = table.table.new_tensor([[1, 4], [0, 4], [EMPTY, EMPTY], [1, 4], [EMPTY, EMPTY]])
    callback = DoppelgangerMining(table)
    logged = {}
    trainer = SimpleNamespace(world_size=1, current_epoch=0)
    module = SimpleNamespace(log_dict=lambda metrics, **_: logged.update(metrics))
    callback.on_train_epoch_start(trainer, module)
    # During the epoch: class 0 switches to 3, class 2 gets its first doppelganger, class 3 keeps 1.
    table.table[:, 0] = table.table.new_tensor([3, 0, 1, 1, EMPTY])
    callback.on_train_epoch_end(trainer, module)
    assert logged["doppel/churn"] == pytest.approx(2 / 5)  # classes 0 and 2 changed
    assert logged["doppel/table_filled"] == pytest.approx(4 / 5)
    assert logged["doppel/hub_count"] == 2.0  # class 1 is the first doppelganger of classes 2 and 3


def test_from_table_is_the_share_of_each_epoch_alone():
    """The sampler's counts are read and reset at each epoch end: epoch 2's share counts epoch 2's draws."""
    table = DoppelgangerTable(num_classes=5)
    callback = DoppelgangerMining(table)
    trainer = SimpleNamespace(world_size=1, current_epoch=0)
    logged = []
    module = SimpleNamespace(log_dict=lambda metrics, **_: logged.append(dict(metrics)))
    for drawn in ({"random": 3, "table": 1}, {"random": 1, "table": 3}):  # as the sampler counts an epoch
        callback.on_train_epoch_start(trainer, module)
        for source, count in drawn.items():
            table.count_draw(source, count)
        callback.on_train_epoch_end(trainer, module)
    assert [m["doppel/from_table"] for m in logged] == [pytest.approx(1 / 4), pytest.approx(3 / 4)]  # not 4 / 8
    assert set(table.draws.values()) == {0}
