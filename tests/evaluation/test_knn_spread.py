"""The nearest-neighbour search spread over 2 and 3 gloo processes against one process: the same metrics to
the bit (retrieval and the prototype protocol's Recall@1), the others released when process 0 fails, and
process 0 refusing the result when another process failed its chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from doppel.data.dataset import Part
from doppel.evaluation import knn
from doppel.evaluation.metrics import retrieval_metrics
from doppel.evaluation.prototype import prototype_metrics
from tests.conftest import free_port


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 120, (900,), generator=generator)
    parts = torch.full((900,), int(Part.TRAIN))
    parts[600:] = int(Part.QUERY)
    parts[600:660] = int(Part.REFERENCE)
    labels[600:660] = torch.arange(200, 260)  # a reference per novel class
    labels[660:] = 200 + torch.randint(0, 60, (240,), generator=generator)
    centres = torch.randn(260, 12, generator=generator)
    embeddings = centres[labels] + 1.2 * torch.randn(900, 12, generator=generator)
    return torch.nn.functional.normalize(embeddings, dim=1), labels, parts


def scored() -> dict[str, dict[str, float]]:
    embeddings, labels, parts = inputs()
    return {"loo": retrieval_metrics(embeddings, labels, ks=(1, 2, 8), chunk=37),
            "gallery": retrieval_metrics(embeddings[:300], labels[:300], embeddings[300:], labels[300:], ks=(1, 4),
                                         chunk=50),
            "prototype": prototype_metrics(embeddings, labels, parts)}


def _worker(rank: int, world: int, port: int, folder: str, failing: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    outcome: dict = {}
    if rank != 0:
        if failing == "other" and rank == world - 1:
            knn.Request.chunk_sums = lambda *args: 1 / 0  # this process's chunks fail
        knn.serve(torch.device("cpu"))
    else:
        try:
            with knn.spread_over_processes(torch.device("cpu")):
                outcome["metrics"] = scored()
                if failing == "zero":
                    raise KeyError("process 0 fails after its requests")
        except Exception as error:
            outcome["error"] = repr(error)
    outcome["released"] = True  # every process gets here: nobody waits forever
    Path(folder, f"{rank}.json").write_text(json.dumps(outcome))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_spread_search_gives_one_process_metrics_to_the_bit(tmp_path: Path, world: int) -> None:
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), ""), nprocs=world, join=True)
    alone = json.loads(json.dumps(scored()))
    assert json.loads((tmp_path / "0.json").read_text())["metrics"] == alone
    assert 0.05 < alone["loo"]["recall@1"] < 0.9 and 0.05 < alone["prototype"]["novel/recall@1"] < 0.9
    assert all(json.loads((tmp_path / f"{r}.json").read_text())["released"] for r in range(world))


def test_a_failure_on_process_0_releases_the_others(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), "zero"), nprocs=2, join=True)
    assert "process 0 fails" in json.loads((tmp_path / "0.json").read_text())["error"]
    assert json.loads((tmp_path / "1.json").read_text())["released"]


def test_a_failure_on_another_process_is_refused_by_process_0(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(3, free_port(), str(tmp_path), "other"), nprocs=3, join=True)
    assert "1 of the other processes failed" in json.loads((tmp_path / "0.json").read_text())["error"]
