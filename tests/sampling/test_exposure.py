"""Exposure statistics against numpy on hand-made counts, and the counts a run logs against the batches
its sampler drew."""

import numpy as np
import pytest
import torch

from doppel.callbacks.exposure import ExposureMonitor, exposure_stats


def test_statistics_of_hand_made_counts():
    counts = torch.tensor([0, 1, 2, 3, 14])  # mean 4
    stats = exposure_stats(counts)
    assert stats["sampler/exposure_cv"] == pytest.approx(np.std([0, 1, 2, 3, 14]) / 4)
    assert stats["sampler/exposure_max"] == pytest.approx(14 / 4)
    assert stats["sampler/exposure_starved"] == pytest.approx(2 / 5)  # 0 and 1 are below 2 (half the mean)
    even = exposure_stats(torch.full((7,), 3))
    assert even == {"sampler/exposure_cv": 0.0, "sampler/exposure_max": 1.0, "sampler/exposure_starved": 0.0}


def test_a_class_counts_once_per_batch_and_counts_restart_each_epoch():
    class Module:
        logged = []

        def log_dict(self, metrics, **kwargs):
            self.logged.append(metrics)

    trainer = type("Trainer", (), {"world_size": 1, "global_rank": 0})()
    monitor, module = ExposureMonitor(4), Module()
    for labels in ([0, 0, 1, 1], [1, 1, 2, 2], [1, 2, 2, 2]):
        monitor.on_train_batch_end(trainer, module, None, (None, torch.tensor(labels)), 0)
    assert monitor.counts.tolist() == [1, 3, 2, 0]  # class 1: 3 batches, not 5 images
    state = {}
    monitor.on_save_checkpoint(trainer, module, state)
    monitor.on_train_epoch_end(trainer, module)
    assert module.logged[-1] == exposure_stats(torch.tensor([1, 3, 2, 0]))
    assert monitor.counts.tolist() == [0, 0, 0, 0]
    resumed = ExposureMonitor(4)
    resumed.on_load_checkpoint(trainer, module, state)
    assert resumed.counts.tolist() == [1, 3, 2, 0]


def test_a_run_logs_the_exposure_of_the_batches_its_sampler_drew(tmp_path):
    """The logged statistics equal those of the recorded batches over all training classes."""
    import csv

    from hydra.utils import instantiate

    from doppel.train import train
    from tests.conftest import compose_cfg
    from tests.e2e.recorder import BatchRecorder

    BatchRecorder.batches.clear()
    cfg = compose_cfg(tmp_path, ["trainer.max_epochs=1", "trainer.limit_train_batches=5",
                                 "+callbacks.recorder._target_=tests.e2e.recorder.BatchRecorder"])
    train(cfg)
    assert len(BatchRecorder.batches) == 5
    counts = torch.zeros(instantiate(cfg.data).num_classes, dtype=torch.long)
    for _, labels in BatchRecorder.batches:
        counts[torch.tensor(sorted(set(labels)))] += 1
    with open(tmp_path / "csv" / "metrics.csv") as file:
        logged = next(row for row in csv.DictReader(file) if row.get("sampler/exposure_cv"))
    for name, value in exposure_stats(counts).items():
        assert float(logged[name]) == pytest.approx(value, rel=1e-6), name
    assert float(logged["sampler/exposure_starved"]) > 0.25  # 5 batches of ~8 classes over ~48: many unseen


def test_a_checkpoint_keeps_every_processs_exposure_counts():
    """Under DDP each process counts its own batches and only process 0 writes the checkpoint: it holds every
    process's counts, and each process resumes its own (before, every process took process 0's)."""
    from types import SimpleNamespace

    from doppel.callbacks.exposure import ExposureMonitor

    monitors = [ExposureMonitor(4), ExposureMonitor(4)]
    monitors[0].counts += torch.tensor([3, 0, 1, 0])
    monitors[1].counts += torch.tensor([0, 2, 0, 5])
    gathered = torch.stack([m.counts for m in monitors])
    module = SimpleNamespace(device=torch.device("cpu"), all_gather=lambda tensor: gathered)
    checkpoint = {}
    monitors[0].on_save_checkpoint(SimpleNamespace(world_size=2), module, checkpoint)
    for rank in (0, 1):
        resumed = ExposureMonitor(4)
        resumed.on_load_checkpoint(SimpleNamespace(world_size=2, global_rank=rank), module, checkpoint)
        assert torch.equal(resumed.counts, gathered[rank])
