"""A sharded classifier's checkpoint: each process writes its rows to its own file, a reader takes the rows
of any class range from the files that hold them (whatever the number of writers), and the checkpoint never
points at a half-written or missing folder. Writers are real gloo process groups of 1, 2 and 3 processes."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import doppel.checkpoint as ckpt
from doppel.checkpoint import (
    CLASS_SHARDS,
    check_state_dict,
    new_shard_folder,
    put_rows,
    read_checkpoint,
    read_class_rows,
    remove_stale_class_shards,
    write_class_shard,
)
from doppel.losses.sharding import ClassShard
from doppel.serialization import CheckpointError, CheckpointWriteError, atomic_save
from tests.conftest import free_port

CLASSES, DIM = 11, 4
WEIGHT, BIAS = "head.weight", "head.bias"


def logical(step: int = 7) -> dict:
    """The whole checkpoint one process would write: a classifier (weight, bias), its momentum, a backbone
    tensor and an optimizer entry that is not per class."""
    g = torch.Generator().manual_seed(step)
    return {
        "state_dict": {"backbone.w": torch.randn(3, 3, generator=g), WEIGHT: torch.randn(CLASSES, DIM, generator=g),
                       BIAS: torch.randn(CLASSES, generator=g)},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.randn(3, 3, generator=g)},
                                        1: {"momentum_buffer": torch.randn(CLASSES, DIM, generator=g),
                                            "step": torch.tensor(float(step))}},
                              "param_groups": [{"params": [0, 1, 2]}]}],
        "global_step": step,
    }


def shard_of(whole: dict, lo: int, hi: int) -> tuple[dict, dict]:
    """(the checkpoint a process holds, its rows by row key), as the module hands them over."""
    states = {i: dict(s) for i, s in whole["optimizer_states"][0]["state"].items()}
    local = {"state_dict": dict(whole["state_dict"]), "optimizer_states": [{**whole["optimizer_states"][0],
                                                                           "state": states}],
             "global_step": whole["global_step"]}
    rows = {f"state_dict/{WEIGHT}": whole["state_dict"][WEIGHT][lo:hi].clone(),
            f"state_dict/{BIAS}": whole["state_dict"][BIAS][lo:hi].clone(),
            "optimizer/0/1/momentum_buffer": whole["optimizer_states"][0]["state"][1]["momentum_buffer"][lo:hi].clone()}
    for key, value in rows.items():
        put_rows(local, key, value)
    return local, rows


def _writer(rank: int, world: int, port: int, folder: str, scenario: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        path = Path(folder) / "last.ckpt"
        whole = logical()
        bounds = ClassShard.bounds(CLASSES, world)
        local, rows = shard_of(whole, bounds[rank], bounds[rank + 1])
        request = new_shard_folder(path, whole["global_step"])
        if scenario == "node_local" and rank == 1:  # this process's run folder is another disk
            request = {**request, "root": str(Path(folder) / "elsewhere")}
        if scenario == "write_fails" and rank == 1:
            def refuse(*_args):
                raise CheckpointWriteError(f"could not write {path}: No space left on device.")
            ckpt.atomic_save = refuse
        try:
            write_class_shard(local, request, rows, bounds)
        except CheckpointWriteError as error:
            (Path(folder) / f"error{rank}.txt").write_text(str(error))
            return
        if rank == 0:
            atomic_save(local, path)
    finally:
        dist.destroy_process_group()



def write(folder: Path, world: int, scenario: str = "") -> Path:
    mp.spawn(_writer, args=(world, free_port(), str(folder), scenario), nprocs=world, join=True)
    return folder / "last.ckpt"


@pytest.fixture(scope="module", params=[1, 2, 3])
def written(request, tmp_path_factory):
    world = request.param
    return world, write(tmp_path_factory.mktemp(f"shards{world}"), world)


def test_each_process_writes_its_rows_and_the_checkpoint_names_them(written):
    world, path = written
    plain = torch.load(path, weights_only=True)
    assert WEIGHT not in plain["state_dict"] and BIAS not in plain["state_dict"]
    assert "momentum_buffer" not in plain["optimizer_states"][0]["state"][1]
    assert plain["optimizer_states"][0]["state"][1]["step"] == 7  # what is not per class stays in the file
    manifest = plain[CLASS_SHARDS]
    assert manifest["bounds"] == ClassShard.bounds(CLASSES, world)
    assert manifest["shapes"] == {f"state_dict/{WEIGHT}": [CLASSES, DIM], f"state_dict/{BIAS}": [CLASSES],
                                  "optimizer/0/1/momentum_buffer": [CLASSES, DIM]}
    files = sorted((path.parent / manifest["folder"]).iterdir())
    assert [f.name for f in files] == [f"rank{r:05d}-of{world:05d}.pt" for r in range(world)]
    whole = logical()
    for rank, file in enumerate(files):
        shard = torch.load(file, weights_only=True)
        lo, hi = manifest["bounds"][rank:rank + 2]
        assert (shard["lo"], shard["hi"]) == (lo, hi)
        assert torch.equal(shard["rows"][f"state_dict/{WEIGHT}"], whole["state_dict"][WEIGHT][lo:hi])


def test_the_whole_checkpoint_reads_back_exactly(written):
    _, path = written
    whole, read = logical(), read_class_rows(read_checkpoint(path))
    assert CLASS_SHARDS not in read
    assert read["state_dict"].keys() == whole["state_dict"].keys()
    for key, tensor in whole["state_dict"].items():
        assert torch.equal(read["state_dict"][key], tensor), key
    for index, state in whole["optimizer_states"][0]["state"].items():
        assert read["optimizer_states"][0]["state"][index].keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(read["optimizer_states"][0]["state"][index][key], tensor), (index, key)
    weights = read_class_rows(read_checkpoint(path), optimizer=False)
    assert "optimizer_states" not in weights and torch.equal(weights["state_dict"][WEIGHT], whole["state_dict"][WEIGHT])


@pytest.mark.parametrize("lo, hi", [(0, 11), (0, 4), (4, 8), (3, 9), (10, 11), (5, 6)])
def test_any_class_range_reads_from_only_the_files_that_hold_it(written, monkeypatch, lo, hi):
    """What a process of another world size takes on resume: its rows, from the writers that held them."""
    world, path = written
    opened = []
    real = ckpt.load_checkpoint

    def recording(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(ckpt, "load_checkpoint", recording)
    read = read_class_rows(read_checkpoint(path), lo, hi)
    whole = logical()
    assert torch.equal(read["state_dict"][WEIGHT], whole["state_dict"][WEIGHT][lo:hi])
    assert torch.equal(read["state_dict"][BIAS], whole["state_dict"][BIAS][lo:hi])
    assert torch.equal(read["optimizer_states"][0]["state"][1]["momentum_buffer"],
                       whole["optimizer_states"][0]["state"][1]["momentum_buffer"][lo:hi])
    bounds = ClassShard.bounds(CLASSES, world)
    needed = [f"rank{r:05d}-of{world:05d}.pt" for r in range(world) if bounds[r] < hi and bounds[r + 1] > lo]
    assert opened == ["last.ckpt", *needed]


def test_the_checkpoint_fits_the_model_by_its_logical_shapes(written):
    _, path = written
    expected = logical()["state_dict"]
    check_state_dict(read_checkpoint(path), expected, "x")
    with pytest.raises(CheckpointError, match=rf"{WEIGHT} is \[11, 4\] in the checkpoint and \[12, 4\] here"):
        check_state_dict(read_checkpoint(path), {**expected, WEIGHT: torch.zeros(12, DIM)}, "x")


def test_handing_rows_over_leaves_the_optimizers_live_state_alone(tmp_path):
    weight = torch.nn.Parameter(torch.randn(CLASSES, DIM))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.sum().backward()
    optimizer.step()
    live = optimizer.state[weight]["momentum_buffer"]
    checkpoint = {"state_dict": {WEIGHT: weight.detach()}, "optimizer_states": [optimizer.state_dict()]}
    request = new_shard_folder(tmp_path / "last.ckpt", 1)
    write_class_shard(checkpoint, request, {f"state_dict/{WEIGHT}": weight.detach(),
                                            "optimizer/0/0/momentum_buffer": live}, [0, CLASSES])
    assert "momentum_buffer" not in checkpoint["optimizer_states"][0]["state"][0]
    assert optimizer.state[weight]["momentum_buffer"] is live  # still there: training goes on with it
    put_rows(checkpoint, "optimizer/0/0/momentum_buffer", torch.zeros(1))
    assert optimizer.state[weight]["momentum_buffer"] is live


@pytest.mark.parametrize("scenario, message", [
    ("write_fails", "process 1: could not write .* No space left on device"),
    ("node_local", "process 0 does not see rank00001-of00002.pt in .*: the run folder must be on a file system "
                   "every node shares")])
def test_a_save_that_one_process_cannot_complete_fails_on_every_process(tmp_path, scenario, message):
    """No process goes on to write a checkpoint that names rows another one could not write (or that the
    first one cannot see): every process raises the same error."""
    write(tmp_path, 2, scenario)
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1]
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "last.ckpt").exists()


def test_an_unfinished_save_leaves_the_previous_checkpoint_whole_and_the_next_one_clears_it(tmp_path):
    path = tmp_path / "last.ckpt"

    def save(step: int, finish: bool = True) -> dict:
        local, rows = shard_of(logical(step), 0, CLASSES)
        request = new_shard_folder(path, step)
        write_class_shard(local, request, rows, [0, CLASSES])
        if finish:
            atomic_save(local, path)
            remove_stale_class_shards(path, keep=request)
        return request

    first = save(1)
    save(2, finish=False)  # killed after the rows, before last.ckpt
    assert len(list((tmp_path / "last.ckpt.classes").iterdir())) == 2
    read = read_class_rows(read_checkpoint(path))
    assert read["global_step"] == 1 and torch.equal(read["state_dict"][WEIGHT], logical(1)["state_dict"][WEIGHT])
    third = save(3)
    assert [p.name for p in (tmp_path / "last.ckpt.classes").iterdir()] == [Path(third["folder"]).name]
    assert first["folder"] != third["folder"]
    assert torch.equal(read_class_rows(read_checkpoint(path))["state_dict"][WEIGHT], logical(3)["state_dict"][WEIGHT])


def test_rows_that_are_missing_mixed_up_or_not_finite_are_refused(tmp_path, written):
    world, source = written
    shutil.copytree(source.parent, tmp_path / "run")
    path = tmp_path / "run" / "last.ckpt"
    folder = path.parent / torch.load(path, weights_only=True)[CLASS_SHARDS]["folder"]
    with pytest.raises(CheckpointError, match="read it with doppel.checkpoint.read_checkpoint"):
        read_class_rows(torch.load(path, weights_only=True))
    first = folder / f"rank00000-of{world:05d}.pt"
    shard = torch.load(first, weights_only=True)
    shard["rows"][f"state_dict/{BIAS}"][0] = float("nan")
    atomic_save(shard, first)
    with pytest.raises(CheckpointError, match=rf"non-finite values in state_dict/{BIAS}"):
        read_class_rows(read_checkpoint(path))
    shard["lo"] += 1
    atomic_save(shard, first)
    with pytest.raises(CheckpointError, match="does not hold the rows .* the folder was altered or mixed"):
        read_class_rows(read_checkpoint(path))
    shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match=r"keeps its classifier's rows in .*, which is missing: .* copy them"):
        read_class_rows(read_checkpoint(path, key="init_from"))

