"""The RecordIO index at WebFace42M scale: the vectorised ``.idx`` parser against the text parser, and the
memory-mapped cache beside the pack (built once under a lock, rebuilt when a file changes, never half read)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from doppel.data.dataset import DataError
from doppel.data.index_cache import cache_folder, cached_arrays
from doppel.data.readers import recordio
from doppel.data.readers.recordio import _read_index_text, read_index, read_recordio, write_recordio
from tests.conftest import ROOT

MXNET = ROOT / "tests" / "data" / "files" / "mxnet"


def mxnet_lines(keys: list[int], offsets: list[int]) -> str:
    return "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets))  # mxnet's write_idx: '%d\t%d\n' % (key, pos)


@pytest.mark.parametrize("name", ["insightface.idx", "im2rec.idx"])
def test_mxnet_indexes_parse_like_the_text_parser(name: str, monkeypatch) -> None:
    text = _read_index_text(MXNET / name)
    monkeypatch.setattr(recordio, "_read_index_text", None)
    fast = read_index(MXNET / name, chunk=13)
    assert fast[0].tolist() == text[0].tolist() and fast[1].tolist() == text[1].tolist()
    assert len(fast[0]) > 3


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
@pytest.mark.parametrize("variant", ["plain", "crlf", "no_last_newline", "blank_lines"])
def test_vectorised_index_parse_equals_the_numbers_written(tmp_path: Path, chunk: int, variant: str,
                                                           monkeypatch) -> None:
    monkeypatch.setattr(recordio, "_read_index_text", None)  # the vectorised parser alone
    rng = np.random.default_rng(chunk)
    keys = rng.permutation(5000)[:300].tolist()  # gaps and any order, as im2rec may write
    offsets = rng.integers(0, 10**15, 300).tolist() + []  # up to 16 digits
    offsets[:3] = [0, 9, 10]
    text = mxnet_lines(keys, offsets)
    if variant == "crlf":
        text = text.replace("\n", "\r\n")
    elif variant == "no_last_newline":
        text = text[:-1]
    elif variant == "blank_lines":
        text = "\n" + text.replace("\n", "\n\n", 5)
    path = tmp_path / "train.idx"
    path.write_bytes(text.encode())
    got_keys, got_offsets = read_index(path, chunk=chunk)
    assert got_keys.tolist() == keys and got_offsets.tolist() == offsets


def test_an_index_outside_mxnet_layout_goes_to_the_text_parser(tmp_path: Path) -> None:
    path = tmp_path / "train.idx"
    path.write_text("1\t 8\n2\t16\n")  # a space: not mxnet's layout, still two integers
    assert [a.tolist() for a in read_index(path)] == [[1, 2], [8, 16]]
    path.write_text("1\t8\n2\tx16\n")
    with pytest.raises(DataError, match=r"line 2: '2\\tx16' is not 'key<TAB>offset'"):
        read_index(path)
    path.write_text("1\t8\t9\n")
    with pytest.raises(DataError, match="line 1"):
        read_index(path)


def small_pack(folder: Path, classes: int = 6, per_class: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rec = folder / "train.rec"
    write_recordio(rec, ((c, [b"\xff\xd8" + bytes([c, i]) for i in range(per_class)]) for c in range(classes)))
    return rec


def test_the_cache_is_built_once_then_mapped_and_gives_the_same_dataset(tmp_path: Path) -> None:
    rec = small_pack(tmp_path / "pack", classes=50, per_class=4)
    plain = read_recordio(str(rec))
    built = read_recordio(str(rec), index_cache="auto")
    folder = tmp_path / "pack" / "train.idx.doppel-cache"
    assert sorted(p.name for p in folder.iterdir()) == ["classes.npy", "keys.npy", "labels.npy", "offsets.npy",
                                                        "stamp.json"]
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    mapped = read_recordio(str(rec), index_cache="auto")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # read, not rebuilt
    assert isinstance(mapped.images.offsets, np.memmap)
    for data in (built, mapped):
        assert torch.equal(data.labels, plain.labels) and data.class_names == plain.class_names
        assert [data.images.fetch(i) for i in range(len(data.labels))] == \
               [plain.images.fetch(i) for i in range(len(plain.labels))]
    # a spawned worker gets the file to map again, not the arrays' bytes
    state = pickle.dumps(mapped.images)
    assert len(state) < 1000 < mapped.images.offsets.nbytes
    again = pickle.loads(state)
    assert again.fetch(5) == plain.images.fetch(5) and isinstance(again.offsets, np.memmap)


def test_a_changed_pack_or_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    rec = small_pack(tmp_path / "pack", classes=6)
    read_recordio(str(rec), index_cache="auto")
    time.sleep(0.01)
    small_pack(tmp_path / "pack", classes=9)  # repacked in place: sizes and times change
    assert len(read_recordio(str(rec), index_cache="auto").class_names) == 9
    labels = tmp_path / "pack" / "train.idx.doppel-cache" / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:-8])  # a cache cut short
    data = read_recordio(str(rec), index_cache="auto")
    assert data.labels.tolist() == read_recordio(str(rec)).labels.tolist()
    assert len(np.load(labels)) == 27


def test_a_read_only_pack_folder_caches_under_xdg_cache_home(tmp_path: Path, monkeypatch) -> None:
    rec = small_pack(tmp_path / "pack")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    pack = str(tmp_path / "pack")
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != pack)  # as a read-only mount (root ignores chmod)
    data = read_recordio(str(rec), index_cache="auto")
    assert not (tmp_path / "pack" / "train.idx.doppel-cache").exists()
    assert len(list((tmp_path / "home" / "doppel").glob("*-train.idx.doppel-cache/labels.npy"))) == 1
    assert data.labels.tolist() == read_recordio(str(rec)).labels.tolist()


def test_cache_locations(tmp_path: Path, monkeypatch) -> None:
    source = small_pack(tmp_path / "pack").with_suffix(".idx")
    assert cache_folder("auto", source) == tmp_path / "pack" / "train.idx.doppel-cache"
    assert cache_folder("off", source) is None and cache_folder(None, source) is None
    chosen = cache_folder(str(tmp_path / "mine"), source)
    assert chosen.parent == tmp_path / "mine" and chosen.name.endswith("-train.idx.doppel-cache")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"data.index_cache='.*file/sub': cannot write the index cache"):
        read_recordio(str(source.with_suffix(".rec")), index_cache=str(blocker / "sub"))


def _build_in_a_process(folder: str, log: str, queue) -> None:
    def build() -> dict[str, np.ndarray]:
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the others arrive while this one builds
        return {"labels": np.arange(10**5, dtype=np.int64)}

    arrays = cached_arrays("auto", "data.index_cache", [Path(folder) / "train.idx"], build)
    queue.put(int(arrays["labels"].sum()))


def test_processes_starting_together_build_the_cache_once(tmp_path: Path) -> None:
    (tmp_path / "train.idx").write_text("0\t0\n")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_build_in_a_process, args=(str(tmp_path), str(tmp_path / "log"), queue))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    sums = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join()
    assert sums == [sum(range(10**5))] * 3
    assert len((tmp_path / "log").read_text().split()) == 1  # one build; the others mapped it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.idx.doppel-cache.lock", "log", "train.idx",
                                                         "train.idx.doppel-cache"]  # no half-built folder left


def test_a_cache_another_node_wrote_meanwhile_is_kept(tmp_path: Path, monkeypatch) -> None:
    """Nodes that share no lock (flock does not cross every network file system) may build at once: the one
    that finds a valid cache in place when it is done keeps it."""
    import contextlib

    from doppel.data import index_cache

    monkeypatch.setattr(index_cache, "_exclusive", lambda lock: contextlib.nullcontext())  # no shared lock
    (tmp_path / "train.idx").write_text("0\t0\n")
    sources = [tmp_path / "train.idx"]

    theirs = []

    def build_while_another_node_finishes() -> dict[str, np.ndarray]:
        index_cache.cached_arrays("auto", "data.index_cache", sources, lambda: {"labels": np.arange(3)})
        theirs.append((tmp_path / "train.idx.doppel-cache" / "labels.npy").stat().st_ino)
        return {"labels": np.arange(3)}

    first = index_cache.cached_arrays("auto", "data.index_cache", sources, build_while_another_node_finishes)
    assert first["labels"].tolist() == [0, 1, 2] and isinstance(first["labels"], np.memmap)
    assert (tmp_path / "train.idx.doppel-cache" / "labels.npy").stat().st_ino == theirs[0]  # theirs, not replaced
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["train.idx",
                                                                                           "train.idx.doppel-cache"]
