"""The sharded classifier (classifier.sharded=true) against the unsharded one, in 1, 2 and 3 processes (gloo):
the same loss, the same gradients of embeddings, class weights and scale, and the same mined table, on a
global batch with unbalanced classes (some repeated, some absent) and a class count no process count divides.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from doppel.losses import prototype as P
from doppel.losses.loss_set import LossSet
from doppel.losses.sharding import ClassShard, gather_rows, sharded_cross_entropy
from doppel.sampling.doppelganger import DoppelgangerTable, Mining, TableUpdate
from tests.conftest import free_port

DIM, CLASSES, ROWS = 6, 11, 8  # rows per process
TERMS = {
    "softmax": lambda: P.Softmax(DIM, CLASSES),
    "l2s": lambda: P.L2Softmax(DIM, CLASSES, scale=4.0),
    "normface": lambda: P.NormFace(DIM, CLASSES, scale=5.0),
    "cosface": lambda: P.CosFace(DIM, CLASSES, scale=8.0, margin=0.3),
    "arcface": lambda: P.ArcFace(DIM, CLASSES, scale=8.0, margin=0.4),
    "sphereface": lambda: P.SphereFace(DIM, CLASSES, margin=3, scale=6.0),
    "lsoftmax": lambda: P.LargeMarginSoftmax(DIM, CLASSES, margin=2),
}
MINING = {"max": Mining(2, "max"), "mean": Mining(2, "mean")}
SAMPLED = ("l2s", "arcface")
RATE = 0.7  # with spread(): every shard's sample holds its positives (Partial FC keeps a fixed width)


def spread(labels: torch.Tensor) -> torch.Tensor:
    """The frequent classes of global_batch() moved apart (x 4 mod 11 permutes the classes)."""
    return labels * 4 % CLASSES


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(world)
    weights = 1.0 / torch.arange(1, CLASSES + 1, dtype=torch.float64) ** 1.5  # unbalanced; some classes absent
    labels = torch.multinomial(weights, world * ROWS, replacement=True, generator=generator)
    return torch.randn(world * ROWS, DIM, generator=generator, dtype=torch.float64).float(), labels


def build(name: str) -> P.PrototypeTerm:
    torch.manual_seed(7)  # every process initialises the same full classifier, then keeps its rows
    return TERMS[name]()


def one_process(name: str, world: int) -> dict:
    """The unsharded term on the whole global batch: the reference."""
    term = build(name)
    x, labels = global_batch(world)
    x.requires_grad_()
    loss, view = term.loss_and_logits(x, labels)
    loss.backward()
    result = {"loss": loss.detach(), "x_grad": x.grad, "scale_grad": _scale_grad(term)}
    result.update({f"grad/{p}": _param(term, p).grad for p in term.class_parameters if _param(term, p) is not None})
    for kind, mining in MINING.items():
        table = DoppelgangerTable(CLASSES, mining.top_k, mining.reduction)
        table.apply(mining.propose(view.logits, view.labels))
        result[f"table/{kind}"] = table.table
    return result


def _param(term, name):
    return getattr(*term._owner(name))


def _scale_grad(term):
    scale = getattr(term, "scale", None)
    return None if scale is None or scale.grad is None else scale.grad.clone()


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x_all, labels_all = global_batch(world)
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        results = {}
        for name in TERMS:
            term = build(name)
            term.sharded = True
            term.shard_(ClassShard(CLASSES, rank, world))
            x = x_all[rows].clone().requires_grad_()
            loss, view = term.loss_and_logits(x, labels_all[rows])
            loss.backward()
            scale_grad = _scale_grad(term)
            if scale_grad is not None:  # replicated: DDP averages it over the processes
                dist.all_reduce(scale_grad)
                scale_grad /= world
            out = {"loss": loss.detach(), "x_grad": x.grad / world,  # DDP averages the backbone's as well
                   "scale_grad": scale_grad, "lo": term.shard.lo if term.shard else 0}
            out.update({f"grad/{p}": _param(term, p).grad for p in term.class_parameters
                        if _param(term, p) is not None})
            for kind, mining in MINING.items():
                update = mining.propose(view.logits, view.labels, view.targets, view.column_classes,
                                        pad_to=len(view.labels))
                table = DoppelgangerTable(CLASSES, mining.top_k, mining.reduction)
                table.apply(TableUpdate(*(gather_rows(t) if world > 1 else t
                                          for t in (update.classes, update.candidates, update.scores))))
                out[f"table/{kind}"] = table.table
                # what the mining callback does for split classes: a row-wise merge of the shards' proposals
                merged = DoppelgangerTable(CLASSES, mining.top_k, mining.reduction)
                shape = (world, *update.scores.shape)
                merged.apply(TableUpdate.merge_shards(
                    update.classes, *(gather_rows(t).view(shape) if world > 1 else t[None]
                                      for t in (update.candidates, update.scores))))
                out[f"merged/{kind}"] = merged.table
            if name in SAMPLED:  # Partial FC on the shards: each process samples its own classes
                term = build(name)
                term.sharded = True
                term.sample_(RATE, "uniform", seed=0)
                term.shard_(ClassShard(CLASSES, rank, world))
                x = x_all[rows].clone().requires_grad_()
                loss, view = term.loss_and_logits(x, spread(labels_all[rows]))
                term.check_sample()
                loss.backward()
                columns = [None] * world
                dist.all_gather_object(columns, view.column_classes)
                out["sampled"] = {"loss": loss.detach(), "x_grad": x.grad / world, "columns": torch.cat(columns)}
            results[name] = out
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module", params=[1, 2, 3])
def sharded_runs(request, tmp_path_factory):
    world = request.param
    folder = tmp_path_factory.mktemp(f"sharded{world}")
    mp.spawn(_worker, args=(world, free_port(), str(folder)), nprocs=world, join=True)
    return world, [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("name", list(TERMS))
def test_sharded_loss_gradients_and_table_equal_the_unsharded_ones(sharded_runs, name):
    world, ranks = sharded_runs
    reference = one_process(name, world)
    edges = ClassShard.bounds(CLASSES, world)
    for rank, result in enumerate(ranks):
        got = result[name]
        assert torch.allclose(got["loss"], reference["loss"], rtol=1e-6, atol=1e-6), (rank, got["loss"])
        own = slice(rank * ROWS, (rank + 1) * ROWS)
        assert torch.allclose(got["x_grad"], reference["x_grad"][own], rtol=1e-5, atol=1e-7), rank
        for key, grad in reference.items():
            if key.startswith("grad/"):
                assert torch.allclose(got[key], grad[edges[rank]:edges[rank + 1]], rtol=1e-5, atol=1e-7), (rank, key)
        if reference["scale_grad"] is not None:
            assert torch.allclose(got["scale_grad"], reference["scale_grad"], rtol=1e-5, atol=1e-7), rank
        for kind in MINING:  # every process ends with the table one process mines from the global batch
            assert torch.equal(got[f"table/{kind}"], reference[f"table/{kind}"]), (rank, kind)
            assert torch.equal(got[f"merged/{kind}"], reference[f"table/{kind}"]), (rank, kind)
    assert (reference["table/max"] >= 0).any()
    if name in SAMPLED:  # the loss over the union of the shards' samples, from the unsharded logits
        columns = ranks[0][name]["sampled"]["columns"]
        x, labels = global_batch(world)
        labels = spread(labels)
        assert set(labels.tolist()) <= set(columns.tolist()) and torch.equal(columns, columns.unique())
        edges_kept = [int(((columns >= a) & (columns < b)).sum()) for a, b in zip(edges, edges[1:])]
        assert edges_kept == [int(RATE * (b - a)) for a, b in zip(edges, edges[1:])]
        x.requires_grad_()
        logits = build(name).loss_and_logits(x, labels)[1].logits
        expected = torch.nn.functional.cross_entropy(logits[:, columns], torch.searchsorted(columns, labels))
        expected.backward()
        for rank, result in enumerate(ranks):
            got = result[name]["sampled"]
            assert torch.allclose(got["loss"], expected.detach(), rtol=1e-6, atol=1e-6), rank
            own = slice(rank * ROWS, (rank + 1) * ROWS)
            assert torch.allclose(got["x_grad"], x.grad[own], rtol=1e-5, atol=1e-7), rank


def test_shards_split_the_classes_as_arcface_torch_does():
    assert ClassShard.bounds(11, 3) == [0, 4, 8, 11]  # the first C % W processes take one more
    assert ClassShard.bounds(4, 4) == [0, 1, 2, 3, 4]
    assert torch.equal(ClassShard(11, 1, 3).targets(torch.tensor([0, 4, 7, 8])), torch.tensor([-1, 0, 3, -1]))
    with pytest.raises(ValueError, match="every process needs at least one class"):
        ClassShard(2, 0, 3)


def _cross_entropy_worker(rank: int, world: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(3)
        logits = (torch.randn(5, 9, generator=generator) * 30).double()  # large: the max shift matters
        targets = torch.tensor([0, 8, 4, 4, 7])
        shard = ClassShard(9, rank, world)
        local = logits[:, shard.lo:shard.hi].clone().requires_grad_()
        loss = sharded_cross_entropy(local, shard.targets(targets))
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_cross_entropy_is_a_hand_computed_softmax_loss(tmp_path):
    """Against -log softmax written out, on logits whose exponentials overflow without the max shift."""
    mp.spawn(_cross_entropy_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 9, generator=generator) * 30).double()
    targets = [0, 8, 4, 4, 7]
    expected = 0.0
    grad = torch.zeros(5, 9, dtype=torch.float64)
    for i, t in enumerate(targets):
        top = max(logits[i].tolist())
        total = sum(math.exp(v - top) for v in logits[i].tolist())
        expected += (math.log(total) + top - float(logits[i, t])) / 5
        for j in range(9):
            grad[i, j] = (math.exp(float(logits[i, j]) - top) / total - (j == t)) / 5
    assert all(abs(float(r["loss"]) - expected) < 1e-9 for r in ranks)
    assert torch.allclose(torch.cat([r["grad"] for r in ranks], dim=1), grad, atol=1e-12)


# -- training: N optimizer steps under DDP, sharded, against one process on the same global batches ----------
STEPS, FEATURES = 5, 10


class Net(torch.nn.Module):
    """A small backbone without batch norm (whose statistics would be per process) and a loss set."""

    def __init__(self, term: str) -> None:
        super().__init__()
        from doppel.losses.loss_set import LossSet

        torch.manual_seed(11)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, DIM))
        spec = {"l2s": {"_target_": "doppel.losses.prototype.L2Softmax", "scale": 4.0},
                "arcface": {"_target_": "doppel.losses.prototype.ArcFace", "scale": 8.0, "margin": 0.3}}[term]
        self.loss_set = LossSet({term: spec}, embedding_dim=DIM, num_classes=CLASSES, classifier={"sharded": True})

    def forward(self, images, labels, mining):
        return self.loss_set(self.backbone(images), labels, mining)


def step_batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + world)
    weights = 1.0 / torch.arange(1, CLASSES + 1, dtype=torch.float64)
    return [(torch.randn(world * ROWS, FEATURES, generator=generator),
             torch.multinomial(weights, world * ROWS, replacement=True, generator=generator)) for _ in range(STEPS)]


def train_steps(net: torch.nn.Module, model: torch.nn.Module, batches, rows: slice, world: int) -> dict:
    """STEPS of SGD (Nesterov momentum, weight decay) and mining; the whole classifier and its momentum, the
    backbone, the table and the accuracy of the whole classifier on a fixed set, as process 0 sees them."""
    from doppel.losses.sharding import gather_classes
    from doppel.module import sharded_names

    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, nesterov=True, weight_decay=5e-4)
    table = DoppelgangerTable(CLASSES, top_k=2)
    for images, labels in batches:
        total, _, update = model(images[rows], labels[rows], table.mining)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if world > 1:
            update = TableUpdate(*(gather_rows(t) for t in (update.classes, update.candidates, update.scores)))
        table.apply(update)
    term = net.loss_set.prototype_term
    names = {name: param for name, param in net.named_parameters() if param.requires_grad}
    shard_names = sharded_names(net, net.loss_set)
    result = {"table": table.table}
    for name, param in names.items():
        momentum = optimizer.state[param]["momentum_buffer"]
        if name in shard_names:
            param, momentum = gather_classes(param.detach(), CLASSES), gather_classes(momentum, CLASSES)
        result[name], result[f"momentum/{name}"] = param, momentum
    whole = term.unsharded()
    if whole is not None:
        generator = torch.Generator().manual_seed(5)
        queries = torch.randn(64, FEATURES, generator=generator)
        truth = torch.randint(CLASSES, (64,), generator=generator)
        with torch.no_grad():
            predicted = whole.class_scores(net.backbone(queries)).argmax(1)
        result["accuracy"] = (predicted == truth).double().mean()
    return result


def _training_worker(rank: int, world: int, port: int, folder: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from doppel.module import shard_classifier

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for term in ("l2s", "arcface"):
            net = Net(term)
            shard_classifier(net, net.loss_set, rank, world)
            model = DistributedDataParallel(net)
            results[term] = train_steps(net, model, step_batches(world), slice(rank * ROWS, (rank + 1) * ROWS), world)
        if rank == 0:
            torch.save(results, f"{folder}/trained.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ddp_training_equals_one_process_on_the_same_global_batches(tmp_path, world):
    mp.spawn(_training_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    from doppel.module import shard_classifier

    def one_process(term: str) -> Net:  # what a single process's setup does to a sharded term: every row
        net = Net(term)
        shard_classifier(net, net.loss_set, 0, 1)
        return net

    trained = torch.load(tmp_path / "trained.pt", weights_only=True)
    for term in ("l2s", "arcface"):
        net = one_process(term)
        everything = slice(0, world * ROWS)
        reference = train_steps(net, net, step_batches(world), everything, 1)
        got = trained[term]
        assert torch.equal(got["table"], reference["table"]), term
        assert (reference["table"] >= 0).float().mean() > 0.5
        for key, value in reference.items():
            if key != "table":
                error = (got[key] - value).abs().max()
                assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-6), (term, key, error)
        start = dict(one_process(term).named_parameters())
        assert all(not torch.allclose(start[k], reference[k]) for k in start if k in reference), "a parameter is stuck"


SPECS = {"softmax": {"_target_": "doppel.losses.prototype.Softmax"},
         "l2s": {"_target_": "doppel.losses.prototype.L2Softmax"},
         "l2s_no_bias": {"_target_": "doppel.losses.prototype.L2Softmax", "bias": False},
         "normface": {"_target_": "doppel.losses.prototype.NormFace"},
         "cosface": {"_target_": "doppel.losses.prototype.CosFace"},
         "arcface": {"_target_": "doppel.losses.prototype.ArcFace"},
         "sphereface": {"_target_": "doppel.losses.prototype.SphereFace"},
         "lsoftmax": {"_target_": "doppel.losses.prototype.LargeMarginSoftmax"}}


@pytest.mark.parametrize("name", list(SPECS))
def test_a_sharded_term_draws_only_its_rows_exactly_as_the_whole_initialisation(name):
    """classifier.sharded: no process builds the whole [C, D] matrix; each draws its rows from the same
    random stream, so the shards are the unsharded initialisation, and the stream after the loss is the
    same (the margin term built next, and anything after it, draws what it would have)."""
    classes, dim = 1001, 7
    torch.manual_seed(5)
    whole = LossSet({name: SPECS[name], "mb": {"_target_": "doppel.losses.exemplar.CosineMarginLoss"}}, dim, classes)
    after_whole = torch.get_rng_state()
    for world in (1, 2, 3):
        for rank in range(world):
            torch.manual_seed(5)
            split = LossSet({name: SPECS[name], "mb": {"_target_": "doppel.losses.exemplar.CosineMarginLoss"}}, dim,
                            classes, classifier={"sharded": True})
            assert torch.equal(torch.get_rng_state(), after_whole)
            term = split.prototype_term
            assert all(t.is_meta for t in term.class_tensors().values())  # nothing [C, D] allocated yet
            if world == 1:
                term.materialize_()
                lo, hi = 0, classes
            else:
                shard = ClassShard(classes, rank, world)
                term.shard_(shard)
                lo, hi = shard.lo, shard.hi
            for key, tensor in whole.prototype_term.class_tensors().items():
                assert torch.equal(term.class_tensors()[key].detach(), tensor.detach()[lo:hi]), (world, rank, key)
                assert term.class_tensors()[key].requires_grad


def test_weights_loaded_into_a_deferred_term_load_whole():
    """eval.py and init_from load a checkpoint before any process knows its share: every row is there."""
    torch.manual_seed(0)
    saved = LossSet({"l2s": SPECS["l2s"]}, 4, 9).state_dict()
    loaded = LossSet({"l2s": SPECS["l2s"]}, 4, 9, classifier={"sharded": True})
    loaded.load_state_dict({k: v + 1 for k, v in saved.items()})
    assert all(torch.equal(loaded.state_dict()[k], v + 1) for k, v in saved.items())
