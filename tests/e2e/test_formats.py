"""One short run per on-disk format, on files the test writes in that format: train a few steps with
``loss=l2s_mb sampler=doppel`` and evaluate, exactly as ``python train.py data=<format> ...`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doppel.data.readers.recordio import write_recordio
from doppel.train import train
from tests.conftest import compose_cfg
from tests.data.formats import (
    encode,
    identities,
    write_cars,
    write_cifar,
    write_cub,
    write_folder,
    write_inshop,
    write_mnist,
    write_mslowshot,
    write_pack,
    write_sop,
)

RUN = ["loss=l2s_mb", "sampler=doppel", "data.num_workers=0", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
       "data.eval_batch_size=16"]


def folder(tmp_path: Path) -> list[str]:
    return ["data=folder", f"data.root={write_folder(tmp_path / 'faces', identities(), 'jpg')}",
            "data.novel_fraction=0.25"]


def csv_with_split(tmp_path: Path) -> list[str]:
    write_folder(tmp_path / "faces", identities(), "png")
    lines = ["path,label,split,role"]
    for c in range(20):
        for i in range(4):
            split, role = ("train", "query" if i == 3 else "") if c < 15 else ("test", "prototype" if i == 0 else "")
            lines.append(f"faces/id{c:03d}/{i:02d}.png,person {c},{split},{role}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    return ["data=csv", f"data.path={tmp_path / 'list.csv'}"]


def recordio(tmp_path: Path) -> list[str]:
    classes = enumerate([encode(image, "jpg") for image in images] for images in identities())
    write_recordio(tmp_path / "train.rec", classes)
    return ["data=recordio", f"data.root={tmp_path / 'train.rec'}", "data.novel_fraction=0.25",
            "data.num_workers=2"]  # each worker opens the pack itself


CROP = ["data.resize=18", "data.crop=16", "data.num_workers=0", "data.persistent_workers=false"]


def cub(tmp_path: Path) -> list[str]:  # 110 classes: CUB's 1-100 train, 101-110 test
    return ["data=cub", f"data.root={write_cub(tmp_path / 'CUB_200_2011', identities(110, 3))}", *CROP]


def cars(tmp_path: Path) -> list[str]:  # 1-98 train, 99-106 test
    return ["data=cars", f"data.root={write_cars(tmp_path / 'cars', identities(106, 3))}", *CROP]


def sop(tmp_path: Path) -> list[str]:
    return ["data=sop", f"data.root={write_sop(tmp_path / 'sop', identities(20, 3), train_classes=14)}", *CROP]


def inshop(tmp_path: Path) -> list[str]:
    return ["data=inshop", f"data.root={write_inshop(tmp_path / 'inshop', identities(20, 4), train_classes=14)}",
            *CROP]


def cifar10(tmp_path: Path) -> list[str]:
    return ["data=cifar10", f"data.root={write_cifar(tmp_path / 'cifar', identities(16, 8, size=32))}"]


def cifar100(tmp_path: Path) -> list[str]:
    return ["data=cifar100", f"data.root={write_cifar(tmp_path / 'cifar', identities(16, 8, size=32), True)}"]


def mnist(tmp_path: Path) -> list[str]:
    return ["data=mnist", f"data.root={write_mnist(tmp_path / 'mnist', identities(10, 12, size=28))}",
            "sampler.examples_per_class=[3,4]"]  # 10 digits: at most 8 classes per batch


def mslowshot(tmp_path: Path) -> list[str]:
    return ["data=mslowshot", f"data.root={write_mslowshot(tmp_path / 'ms', identities(20, 4), n_base=15)}",
            "data.dev=DevSet.tsv", "data.persistent_workers=false"]


FORMATS = {"folder": folder, "csv": csv_with_split, "recordio": recordio, "cub": cub, "cars": cars, "sop": sop,
           "inshop": inshop, "cifar10": cifar10, "cifar100": cifar100, "mnist": mnist,
           "mslowshot": mslowshot}
# Each benchmark's own protocol (its data config selects it): closed-set classification (the IE paper),
# retrieval with the benchmark's Recall@K list (the SEC paper); the face formats use prototypes.
HEADLINE = {"cifar10": "classification/top1", "cifar100": "classification/top1", "mnist": "classification/top1",
            "cub": "retrieval/recall@32", "cars": "retrieval/recall@32", "sop": "retrieval/recall@1000",
            "inshop": "retrieval/recall@50"}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_short_run_trains_and_evaluates_on_each_format(name, tmp_path):
    cfg = compose_cfg(tmp_path, [*RUN, *FORMATS[name](tmp_path)])
    metrics = train(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert metrics["doppel/table_filled"] > 0  # the doppel sampler was fed by mining
    metric = HEADLINE.get(name, "novel/recall@1")
    assert 0 < metrics[f"test/{metric}"] <= 1, metrics
    assert metrics.objective == "test/" + HEADLINE.get(name, "novel/coverage@0.99").replace("@32", "@1").replace(
        "@1000", "@1").replace("@50", "@1")


def test_verification_packs_beside_the_data_are_evaluated_pair_by_pair(tmp_path):
    """Two packs of the same 40 pairs, one labelled right (a 'same' pair is one image twice, a 'different'
    pair two identities) and one with every label flipped: right labels verify near 100%, flipped ones at
    best 50% (threshold 0: all 'different'); so the pairs and their labels reach the metric in order."""
    from doppel.data.readers.verification_bin import write_verification_bin

    classes = identities()
    root = write_folder(tmp_path / "faces", classes, "png")
    images, issame = [], []
    for c in range(20):
        images += [encode(classes[c][3], "jpg"), encode(classes[c][3], "jpg")]
        images += [encode(classes[c][2], "jpg"), encode(classes[(c + 7) % 20][2], "jpg")]
        issame += [True, False]
    write_verification_bin(root / "right.bin", images, issame)
    write_verification_bin(tmp_path / "flipped.bin", images, [not s for s in issame], protocol=2)
    metrics = train(compose_cfg(tmp_path, [*RUN, "data=folder", f"data.root={root}", "data.novel_fraction=0.25",
                                           "eval=[prototype,face_verification]",
                                           f"eval.verification.packs=[right.bin,{tmp_path / 'flipped.bin'}]",
                                           "objective=test/right/accuracy"]))
    assert metrics["test/right/accuracy"] >= 0.9
    assert metrics["test/flipped/accuracy"] <= 0.6
    assert metrics.keys() >= {"test/right/accuracy_std", "test/novel/top1"}


def faces_with_a_pack(tmp_path: Path) -> list[str]:
    """A folder of identities with a verification pack beside it (as InsightFace ships lfw.bin)."""
    classes = identities()
    root = write_folder(tmp_path / "faces", classes, "png")
    write_pack(root / "lfw.bin", classes)
    return ["data=folder", f"data.root={root}", "data.novel_fraction=0.25"]


# The acceptance commands: each benchmark with its paper's protocol, printed and written.
ACCEPTANCE = {
    "cub": (cub, "eval=retrieval", "[retrieval]", ["retrieval/recall@32", "retrieval/map@r", "retrieval/nmi"]),
    "sop": (sop, "eval=retrieval", "[retrieval]", ["retrieval/recall@1000", "retrieval/f1"]),
    "inshop": (inshop, "eval=retrieval", "[retrieval]", ["retrieval/recall@50", "retrieval/r_precision"]),
    "bin": (faces_with_a_pack, "eval=face_verification", "[verification]",
            ["lfw/accuracy", "lfw/accuracy_std", "lfw/threshold", "lfw/tar@far=0.001"]),
    "mnist": (mnist, "eval=classification", "[classification]", ["classification/top1"]),
}


@pytest.mark.parametrize("name", sorted(ACCEPTANCE))
def test_the_command_line_evaluates_each_benchmark_with_its_protocol(name, tmp_path):
    from tests.conftest import TINY
    from tests.e2e.cli import run_cli

    data, protocol, header, names = ACCEPTANCE[name]
    run = tmp_path / "run"
    result = run_cli([*TINY, *RUN, *data(tmp_path), protocol, "data.max_groups=null", f"hydra.run.dir={run}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    tested = sorted(k[len("test/"):] for k in metrics if k.startswith("test/"))
    assert set(names) <= set(tested) and all(metrics[f"test/{n}"] == metrics[f"test/{n}"] for n in names)
    assert header in result.stdout and "final metrics" in result.stdout
    assert len(tested) == len(set(tested)) and not any(k.startswith(("novel/", "base/")) for k in tested)
    figure = {"[retrieval]": "recall_at_k.png", "[verification]": "roc.png"}.get(header)
    assert figure is None or (run / figure).stat().st_size > 1000


def test_an_unreadable_query_is_left_out_never_swapped_for_its_prototype(tmp_path):
    """data.skip_corrupt=true with a novel query cut short: the run scores the other queries exactly as a
    run on the same folder without that file (same training: the query is not trained on), and prints the
    part it left out; before, the query was replaced by its class's next image, often its prototype."""
    import shutil

    from doppel.data.dataset import Part
    from doppel.data.readers.folder import read_folder
    from doppel.data.split import split_dataset

    classes = identities(20, 4)
    broken_root = write_folder(tmp_path / "broken", classes, "png")
    split = split_dataset(read_folder(str(broken_root)), novel_fraction=0.25)
    novel = sorted({split.names[int(label)] for label in split.label[split.part == Part.QUERY]})[0]
    shutil.copytree(broken_root, tmp_path / "clean")
    (tmp_path / "clean" / novel / "02.png").unlink()
    image = broken_root / novel / "02.png"
    image.write_bytes(image.read_bytes()[:40])
    settings = [*RUN, "data=folder", "data.novel_fraction=0.25", "data.skip_corrupt=true", "trainer.max_epochs=2"]
    with pytest.warns(UserWarning, match=r"02.png \(QUERY\) is unreadable: left out of the evaluation"):
        left_out = train(compose_cfg(tmp_path / "a", [*settings, f"data.root={broken_root}"]))
    without = train(compose_cfg(tmp_path / "b", [*settings, f"data.root={tmp_path / 'clean'}"]))
    assert {k: v for k, v in left_out.items() if k.startswith("test/")} == \
        pytest.approx({k: v for k, v in without.items() if k.startswith("test/")})
