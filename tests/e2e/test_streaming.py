"""A RecordIO pack far larger than what the run may hold trains without being loaded: the process's
anonymous memory and the bytes it reads stay those of the images it uses, not of the pack."""

import json

import numpy as np
import torch

from doppel.data.readers.recordio import write_recordio
from tests.conftest import TINY
from tests.data.formats import encode
from tests.e2e.cli import run_cli


def pack(path, n_classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True)

    def images(c):
        for _ in range(per_class):  # 64x64 noise: ~12 KB as PNG, 12 KB decoded
            yield encode(torch.from_numpy(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)), "png")

    write_recordio(path, ((c, images(c)) for c in range(n_classes)))
    return path.stat().st_size


def run(tmp_path, rec, name, novel_fraction):
    folder = tmp_path / name
    result = run_cli([*TINY, "data=recordio", f"data.root={rec}", "data.max_groups=null", "data.num_workers=0",
                      "data.persistent_workers=false", f"data.novel_fraction={novel_fraction}",
                      "trainer.max_epochs=1", "trainer.limit_train_batches=5", "lsuv.batch_size=24",
                      "data.eval_batch_size=24",
                      # base prototypes from the classifier: the mean ones embed every training image
                      # (docs/evaluation.md), which reads the whole pack by design
                      "eval.prototype.base_prototypes=classifier",
                      "+callbacks.memory._target_=tests.e2e.recorder.MemoryRecorder",
                      f"+callbacks.memory.folder={folder}", f"hydra.run.dir={folder}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "memory.json").read_text())


def test_a_pack_of_20000_images_trains_in_the_memory_of_a_pack_of_200(tmp_path):
    big = pack(tmp_path / "big" / "train.rec", 1000, 20)
    pack(tmp_path / "small" / "train.rec", 100, 2)
    assert big > 230 * 2**20
    # ~20 novel identities in both runs and batches no larger than the training batch, so that evaluation
    # holds the same activations in both and the difference is what the pack size adds
    small_run = run(tmp_path, tmp_path / "small" / "train.rec", "s", novel_fraction=0.2)
    big_run = run(tmp_path, tmp_path / "big", "b", novel_fraction=0.02)
    # loading the pack would add its size (~240 MB, encoded or decoded); the big run holds 20,000 labels more
    print(f"peak anonymous memory: {small_run['peak_rss_anon'] / 2**20:.0f} MB (200 images), "
          f"{big_run['peak_rss_anon'] / 2**20:.0f} MB (20,000 images, pack {big / 2**20:.0f} MB)")
    assert big_run["peak_rss_anon"] - small_run["peak_rss_anon"] < 64 * 2**20, (big_run, small_run, big)
    # bytes read beyond those of the small run (imports read the same): the images used, not the pack
    assert big_run["rchar"] - small_run["rchar"] < 0.1 * big, (big_run, small_run, big)
