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
    write_data_files(folder)


def write_data_files(folder: Path) -> None:
    """Datasets with the faults real ones have: an empty class folder, a truncated JPEG, damaged RecordIO
    packs, a manifest without a label column."""
    import shutil

    from doppel.data.readers.recordio import frame, pack, read_index, write_recordio
    from tests.data.formats import encode, identities, write_folder

    classes = identities(20, 4)
    write_folder(folder / "faces_with_empty_class", classes, "jpg")
    (folder / "faces_with_empty_class" / "empty").mkdir()
    faces = write_folder(folder / "faces_with_truncated_jpeg", classes, "jpg")
    broken = faces / "id003" / "01.jpg"
    broken.write_bytes(broken.read_bytes()[:100])  # a copy cut short
    good = folder / "good.rec"
    write_recordio(good, enumerate([encode(image, "jpg") for image in images] for images in classes))
    for name in ("truncated", "offset_past_end", "shifted"):
        shutil.copy(good, folder / f"{name}.rec")
        shutil.copy(good.with_suffix(".idx"), folder / f"{name}.idx")
    (folder / "truncated.rec").write_bytes(good.read_bytes()[:-100])
    keys, offsets = read_index(good.with_suffix(".idx"))
    lines = [f"{k}\t{o}" for k, o in zip(keys.tolist(), offsets.tolist())]
    (folder / "offset_past_end.idx").write_text("\n".join(lines[:5] + [f"5\t{10**9}"] + lines[6:]) + "\n")
    (folder / "shifted.idx").write_text("\n".join(lines[:5] + [f"5\t{offsets[5] + 4}"] + lines[6:]) + "\n")
    records = [frame(pack(float(c), encode(images[0], "jpg"), c)) for c, images in enumerate(classes)]
    records[7] = frame(pack(2.0**24, encode(classes[7][0], "jpg"), 7))
    starts = [sum(map(len, records[:i])) for i in range(len(records))]
    (folder / "huge_label.rec").write_bytes(b"".join(records))
    (folder / "huge_label.idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(starts)))
    (folder / "no_label.csv").write_text("path,class\nfaces_with_empty_class/id000/00.jpg,a\n")
    records[7] = frame(pack(7.0, encode(classes[7][0], "jpg"), 7))
    records[2] = frame(b"\x01" * 10)  # an image record cut inside its 24-byte header
    (folder / "short_record.rec").write_bytes(b"".join(records))
    starts = [sum(map(len, records[:i])) for i in range(len(records))]
    (folder / "short_record.idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(starts)))
    (folder / "classes_twice.txt").write_text("id000\nid001\nid002\nid000/\n")
    images = [f"faces_with_empty_class/id{c:03d}/{i:02d}.jpg" for c in range(20) for i in range(4)]
    (folder / "roles_only.csv").write_text("path,label,role\n" + "".join(
        f"{path},{path.split('/')[1]},{'query' if path.endswith('03.jpg') else ''}\n" for path in images))
    superscript_two = "\u00b2"  # a digit to str.isdigit, not to int()
    (folder / "superscript.csv").write_text("path,label\n" + "".join(
        f"{path},{superscript_two if '/id007/' in path else int(path.split('/')[1][2:])}\n" for path in images),
        encoding="utf-8")
    (folder / "rows_twice.csv").write_text("path,label\n" + "".join(
        f"{path},{path.split('/')[1]}\n" for path in images * 2))
    (folder / "two_labels.csv").write_text("path,label\n" + "".join(
        f"{path},{path.split('/')[1]}\n" for path in images) + f"{images[5]},id019\n")
    (folder / "latin1.csv").write_bytes(("path,label\n" + "".join(
        f"{path},Jos\u00e9{path.split('/')[1]}\n" for path in images)).encode("latin-1"))
