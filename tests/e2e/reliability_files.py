"""The files that the rows of docs/reliability.md name, written the way each kind of bad file arises."""

import os
import pickle
import random
from pathlib import Path

import torch

from doppel.serialization import atomic_save
from doppel.train import train
from tests.conftest import compose_cfg


class SystemCall:
    """Unpickling this calls os.system: the classic crafted checkpoint (the command only echoes)."""

    def __reduce__(self):
        return os.system, ("echo crafted checkpoint ran",)


def write_files(folder: Path) -> None:
    """In ``folder``: a finished 2-epoch run (run/) and every bad file the table's commands name."""
    run = folder / "run"
    train(compose_cfg(run, ["trainer.max_epochs=2", "trainer.limit_train_batches=3"]))
    good = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    atomic_save(good, folder / "last.ckpt")
    (folder / "random.ckpt").write_bytes(random.Random(4096).randbytes(4096))  # 4 KB, seeded: the same each run
    (folder / "empty.ckpt").write_bytes(b"")
    data = (folder / "last.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({**good, "extra": SystemCall()}, folder / "crafted.ckpt")
    (folder / "pickled.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    torch.save(torch.nn.Linear(4, 4), folder / "model.ckpt")
    lightning = {k: v for k, v in good.items() if k != "doppel"}  # a Lightning checkpoint of other code
    atomic_save(lightning, folder / "lightning.ckpt")
    diverged = {**good, "state_dict": dict(good["state_dict"])}
    key = next(k for k in diverged["state_dict"] if k.endswith("head.fc.weight"))
    diverged["state_dict"][key] = diverged["state_dict"][key].clone()
    diverged["state_dict"][key][0, :3] = float("nan")
    atomic_save(diverged, folder / "diverged.ckpt")
    overflow = {**good, "state_dict": dict(good["state_dict"])}
    overflow["state_dict"][key] = torch.full_like(good["state_dict"][key], 3e38)
    atomic_save(overflow, folder / "overflow.ckpt")
    two = {**good, "doppel": {**good["doppel"], "processes": good["doppel"]["processes"] * 2}}
    atomic_save(two, folder / "two_processes.ckpt")
    torch.save({"conv1_7x7_s2.weight": torch.zeros(1), "extra": SystemCall()}, folder / "crafted.pth")
    (folder / "a_file").write_text("not a folder")
