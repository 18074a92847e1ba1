"""Runs the configured protocols: picks the evaluation sets, collects what the module embeds, gathers it
across processes, scores it once, and writes / logs the curves.

Distributed: each process embeds every ``world_size``-th item of every set; the rows are gathered to
process 0 (one ``gather`` per set), which computes the metrics once and broadcasts them. The result equals
the single-process one because every set is reassembled in item order before anything is scored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from doppel import distributed
from doppel.data.dataset import Part
from doppel.evaluation import knn
from doppel.evaluation.protocol import DataFacts, Embedded, Inputs, Protocol, Result
from doppel.losses.loss_set import LossSet

SPLIT = "split"  # the set of split images, beside the pair sets' names


class Evaluator:
    def __init__(self, protocols: dict[str, Protocol]) -> None:
        if not protocols:
            raise ValueError("eval: no protocol is selected; choose one, e.g. eval=prototype or eval=retrieval.")
        self.protocols = protocols
        self.blocks = 1  # an ensemble's networks (set by eval.py for ckpt_path=[...])
        self.sets: list[str] = []  # evaluation loader i embeds set sets[i]
        self.flips: list[bool] = []  # whether loader i's images are embedded mirrored as well
        self.labels: torch.Tensor | None = None  # of the embedded split images
        self.parts: torch.Tensor | None = None
        self.sizes: list[int] = []
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        self._dropped: dict[int, list[int]] = {}  # loader -> items left out (unreadable, data.skip_corrupt)
        # Of the last evaluation (process 0), for the figures and the diagnostics: the split images'
        # embeddings and each protocol's result.
        self.last_split: Embedded | None = None
        self.last_results: dict[str, Result] = {}

    # -- set-up ------------------------------------------------------------------------------
    def bind(self, datamodule: Any) -> None:
        """Let every protocol check the data and choose its sets; tell the datamodule what to load."""
        datamodule.setup()
        split = datamodule.split
        facts = DataFacts(parts=split.part, references_given=split.references_given, benchmark=datamodule.benchmark,
                          folder=datamodule.folder, locate=datamodule.locate, labels=split.label)
        seen: dict[str, str] = {}
        for name, protocol in self.protocols.items():
            protocol.bind(facts)
            for metric in protocol.metric_names():
                if metric in seen:
                    raise ValueError(f"eval.{name} and eval.{seen[metric]} both report {metric}: drop one of them.")
                seen[metric] = name
        # set name -> whether any protocol scoring it fuses mirrored images
        flips: dict[str, bool] = {}
        parts: set = set()
        pair_sets = {}
        for protocol in self.protocols.values():
            wanted = [SPLIT] if protocol.parts() else []
            parts |= protocol.parts()
            pair_sets.update(protocol.pair_sets())
            for name in wanted + list(protocol.pair_sets()):
                flips[name] = flips.get(name, False) or protocol.flip
        positions = split.positions(parts) if parts else None
        self.sets = ([SPLIT] if positions is not None else []) + list(pair_sets)
        self.flips = [flips[s] for s in self.sets]
        if positions is not None:
            self.labels, self.parts = split.label[positions], split.part[positions]
        self.sizes = ([len(positions)] if positions is not None else []) + [len(p.images) for p in pair_sets.values()]
        datamodule.evaluate_on(positions, list(pair_sets.values()))

    def check_model(self, loss_set: LossSet) -> None:
        """Before training: a protocol that scores with the training classifier needs the loss to have one."""
        for name, protocol in self.protocols.items():
            if protocol.needs_classifier and loss_set.prototype_term is None:
                raise ValueError(f"eval.{name} scores the training classifier, and the loss "
                                 f"({', '.join(loss_set.terms)}) has none: use a loss with a classifier term "
                                 "(loss=softmax, l2s_mb, ie, cosface, ...) or another protocol.")

    def metric_names(self) -> list[str]:
        return [m for protocol in self.protocols.values() for m in protocol.metric_names()]

    def headline(self) -> str:
        return next(iter(self.protocols.values())).headline

    # -- collecting --------------------------------------------------------------------------
    def add(self, loader: int, index: torch.Tensor, plain: torch.Tensor, flipped: torch.Tensor | None) -> None:
        """A batch's embeddings; an item index ``-1 - i`` marks item i as left out (its row is a stand-in)."""
        index = index.cpu()
        left_out = index < 0
        if left_out.any():
            index = torch.where(left_out, -1 - index, index)
            self._dropped.setdefault(loader, []).extend(index[left_out].tolist())
        self._rows.setdefault(loader, []).append(
            (index, plain.float().cpu(), None if flipped is None else flipped.float().cpu()))

    def discard(self) -> None:
        self._rows, self._dropped = {}, {}

    def compute(self, classify: Callable[[torch.Tensor], torch.Tensor] | None, where: str,
                class_vectors: Callable[[], torch.Tensor] | None = None,
                device: torch.device | None = None) -> dict[str, float]:
        """Every protocol's metrics from the embeddings collected since the last call (on every process);
        ``classify`` and ``class_vectors`` give the training classifier's scores and class vectors. Process 0
        scores; the nearest-neighbour search is spread over every process, each on its ``device``
        (:mod:`doppel.evaluation.knn`)."""
        rows, self._rows = self._rows, {}
        dropped, self._dropped = self._dropped, {}
        embedded: dict[str, Embedded] = {}
        for loader, name in enumerate(self.sets):
            parts = rows.get(loader, [])
            index = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
            # The plain and mirrored embeddings side by side: one gather for both.
            local = torch.cat([torch.cat(p[1:] if self.flips[loader] else p[1:2], dim=1) for p in parts]) \
                if parts else None
            gathered = _gather(index, local, self.sizes[loader])
            left_out = _gather_items(dropped.get(loader, []))
            if gathered is not None:
                plain, flipped = gathered.tensor_split(2, dim=1) if self.flips[loader] else (gathered, None)
                item = Embedded(plain, flipped, self.labels if name == SPLIT else None,
                                self.parts if name == SPLIT else None, self.blocks)
                embedded[name] = _without(item, left_out, where)
        outcome: list[dict[str, float] | BaseException | None] = [None]
        device = device or torch.device("cpu")
        if distributed.rank() != 0:
            knn.serve(device)
        else:
            with knn.spread_over_processes(device):
                outcome[0] = self._score(embedded, classify, class_vectors, where)
        if distributed.world() > 1:
            dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _score(self, embedded: dict[str, Embedded], classify: Callable[[torch.Tensor], torch.Tensor] | None,
               class_vectors: Callable[[], torch.Tensor] | None, where: str) -> dict[str, float] | BaseException:
        """Process 0: every protocol's metrics, or the error (which every process then raises)."""
        try:
            for name, item in embedded.items():
                _check_finite(item, f"{where} embeddings" + (f" of {name}" if name != SPLIT else ""))
            self.last_split = embedded.get(SPLIT)
            inputs = Inputs(split=embedded.get(SPLIT), pairs={k: v for k, v in embedded.items() if k != SPLIT},
                            classify=classify, class_vectors=class_vectors)
            self.last_results = {name: protocol.evaluate(inputs) for name, protocol in self.protocols.items()}
            metrics = {k: v for result in self.last_results.values() for k, v in result.metrics.items()}
            undefined = [k for k, v in metrics.items() if v != v]
            if undefined:  # never into metrics.json or a sweep's objective
                raise FloatingPointError(f"{where} metrics {', '.join(undefined)} are undefined (NaN): the "
                                         "evaluation sets leave nothing to score them on; check the data's split.")
            return metrics
        except Exception as error:  # every process raises it, none waits for the others forever
            return error

    # -- outputs -----------------------------------------------------------------------------
    def write_figures(self, folder: Path, suffix: str = "") -> list[Path]:
        """Each protocol's curves of the last evaluation as ``<folder>/<stem><suffix>.png`` (process 0)."""
        import matplotlib.pyplot as plt

        written = []
        for name, result in self.last_results.items():
            for stem, figure in self.protocols[name].figures(result):
                path = folder / f"{stem}{suffix}.png"
                figure.savefig(path, dpi=120)
                plt.close(figure)
                written.append(path)
        return written

    def summary(self, metrics: dict[str, float]) -> list[str]:
        lines = []
        for name, protocol in self.protocols.items():
            lines += [f"[{name}]", *protocol.summary(metrics)]
        return lines


def _gather(index: torch.Tensor, rows: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """The rows of all processes in item order on process 0 (None elsewhere)."""
    world = distributed.world()
    if world == 1:
        if rows is None or len(index) != size:
            raise RuntimeError(f"the evaluation embedded {len(index)} of {size} items: an evaluation loader was "
                               "cut short (trainer.limit_val_batches / limit_test_batches must stay 1.0).")
        return rows[torch.argsort(index)]
    # Every process holds ceil(size / world) rows at most (items r, r + world, ...): pad to that.
    share = -(-size // world)
    device = distributed.comm_device()
    width = torch.tensor([rows.shape[1] if rows is not None and len(rows) else 0], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    padded = torch.zeros(share, int(width), device=device)
    padded_index = torch.full((share,), -1, dtype=torch.long, device=device)
    if rows is not None and len(rows):
        padded[:len(rows)], padded_index[:len(index)] = rows.to(device), index.to(device)
    rank = dist.get_rank()
    rows_out = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    index_out = [torch.empty_like(padded_index) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, rows_out, dst=0)
    dist.gather(padded_index, index_out, dst=0)
    if rank != 0:
        return None
    index_all, rows_all = torch.cat(index_out).cpu(), torch.cat(rows_out).cpu()
    kept = index_all >= 0
    if int(kept.sum()) != size:
        raise RuntimeError(f"the evaluation embedded {int(kept.sum())} of {size} items across {world} processes: an "
                           "evaluation loader was cut short (trainer.limit_val_batches must stay 1.0).")
    result = torch.empty(size, rows_all.shape[1])
    result[index_all[kept]] = rows_all[kept]
    return result


def _gather_items(items: list[int]) -> list[int]:
    """The items of every process (on every process)."""
    if distributed.world() == 1:
        return items
    everyone: list[list[int] | None] = [None] * distributed.world()
    dist.all_gather_object(everyone, items)
    return [i for part in everyone for i in part]


def _without(item: Embedded, left_out: list[int], where: str) -> Embedded:
    """``item`` without the rows of the items left out (unreadable images under data.skip_corrupt), which
    are counted per part on the console."""
    if not left_out:
        return item
    keep = torch.ones(len(item.plain), dtype=torch.bool)
    keep[torch.tensor(sorted(set(left_out)))] = False
    if item.parts is not None:
        counts = {Part(int(p)).name: int(n) for p, n in zip(*torch.unique(item.parts[~keep], return_counts=True))}
        print(f"{where}: left out {int((~keep).sum())} unreadable images (data.skip_corrupt): "
              + ", ".join(f"{n} {part}" for part, n in sorted(counts.items())), flush=True)
    return Embedded(item.plain[keep], None if item.flipped is None else item.flipped[keep],
                    None if item.labels is None else item.labels[keep],
                    None if item.parts is None else item.parts[keep], item.blocks)


def _check_finite(item: Embedded, where: str) -> None:
    for rows in (item.plain, item.flipped):
        if rows is None:
            continue
        finite = torch.isfinite(rows).all(dim=1)
        if not finite.all():
            raise FloatingPointError(
                f"{int((~finite).sum())} of {len(finite)} {where} are not finite: the network diverged (lower "
                "optim.lr) or its weights overflow; no metrics are computed from them.")

