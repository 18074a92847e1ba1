"""The doppelganger table: for every training identity, its most similar other identities.

Sec. 3.2 of the Doppelganger paper: after each training step, for each class in the mini-batch the
highest-scoring *other* class of the prototype loss's logits becomes its doppelganger. The logits are
already computed by the loss, so mining costs one top-k over a B x C matrix and no forward pass.

An update is split in two so that several processes can share one table:
:meth:`Mining.propose` turns one step's logits into a fixed-size :class:`TableUpdate` inside the prototype
term's forward (padded to the batch size, so it can be all-gathered; nothing [B, C] outlives the step),
and :meth:`DoppelgangerTable.apply` writes any number of gathered updates, merging the candidates of a
class proposed by several processes, so every rank that applies the same updates ends with the same
table. With ``reduction="max"`` that table is the one a single process would mine from the whole global
batch, whether the processes split the batch (data parallelism: each proposes from its own rows) or the
classes (a sharded classifier: each proposes from its own columns, for every row of the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY = -1
REDUCTIONS = ("max", "mean")


@dataclass
class TableUpdate:
    """One step's proposals: ``classes[i]`` gets ``candidates[i]`` (best first) with ``scores[i]``.

    Rows with ``classes == -1`` are padding.
    """

    classes: torch.Tensor  # [R] long
    candidates: torch.Tensor  # [R, k] long
    scores: torch.Tensor  # [R, k] float

    @staticmethod
    def gathered(classes: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor,
                 split_classes: bool) -> TableUpdate:
        """One update from every process's proposals stacked along a first dimension W ([W, R], [W, R, k]):
        all their rows (the processes split the batch: :meth:`DoppelgangerTable.apply` merges repeated
        classes), or, when the processes split the classes, their rows merged (:meth:`merge_shards`)."""
        if split_classes:
            return TableUpdate.merge_shards(classes[0], candidates, scores)
        return TableUpdate(classes.flatten(0, 1), candidates.flatten(0, 1), scores.flatten(0, 1))

    @staticmethod
    def merge_shards(classes: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor) -> TableUpdate:
        """One update from the proposals of W processes that split the classes: ``classes`` [R] (the same on
        every process: each mined the same global batch), ``candidates`` / ``scores`` [W, R, k] from disjoint
        columns. A class's best k of the W x k is what :meth:`DoppelgangerTable.apply` would keep, found
        without sorting W x R x k triples."""
        world, rows, k = scores.shape
        scores = scores.permute(1, 0, 2).reshape(rows, world * k)
        candidates = candidates.permute(1, 0, 2).reshape(rows, world * k)
        best, slot = scores.topk(k, dim=1)
        chosen = candidates.gather(1, slot).masked_fill(best == float("-inf"), EMPTY)
        return TableUpdate(classes, chosen, best)

    @staticmethod
    def cat(updates: list[TableUpdate]) -> TableUpdate:
        return TableUpdate(
            torch.cat([u.classes for u in updates]),
            torch.cat([u.candidates for u in updates]),
            torch.cat([u.scores for u in updates]),
        )


@dataclass(frozen=True)
class Mining:
    """How one step's logits become proposals: each batch class's ``top_k`` best other classes, a
    candidate scored by its highest logit over the class's examples (``reduction="max"``) or their mean.

    Runs inside the prototype term's forward, on whatever columns of the classifier it holds: all classes,
    one process's shard (``column_classes`` = the shard's class ids) or a Partial FC sample.
    """

    top_k: int = 1
    reduction: str = "max"

    def propose(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None,
                column_classes: torch.Tensor | None = None, pad_to: int | None = None) -> TableUpdate:
        """Proposals from logits [B, C'] over C' columns, in global class ids.

        ``labels`` [B] are global class ids; ``targets`` [B] the column of each row's own class (-1 where
        these columns do not hold it; default: ``labels``); ``column_classes`` [C'] the class of each column
        (default: column j is class j). A class never proposes itself; a class with fewer than ``top_k``
        other columns proposes ``EMPTY`` in the slots left.
        """
        logits = logits.detach()
        targets = labels if targets is None else targets
        width = logits.shape[1]
        if self.reduction == "max":  # one proposal per row; apply() keeps each class's best: no sync
            classes = labels
            scores, candidates = _row_best(logits, targets, self.top_k)
        else:  # a class's mean needs its rows together: unique() makes the host wait for the device
            classes, inverse = torch.unique(labels, return_inverse=True)
            counts = torch.bincount(inverse, minlength=len(classes)).to(logits.dtype)
            per_class = logits.new_zeros(len(classes), width).index_add_(0, inverse, logits)
            per_class /= counts[:, None]
            own = targets.new_full((len(classes),), -1).scatter_(0, inverse, targets)  # a class's own column
            column = own.clamp_min(0)[:, None]
            per_class.scatter_(1, column, torch.where(own[:, None] >= 0, float("-inf"), per_class.gather(1, column)))
            scores, candidates = per_class.topk(min(self.top_k, width), dim=1)
        if column_classes is not None:
            candidates = column_classes[candidates]
        candidates = candidates.masked_fill(scores == float("-inf"), EMPTY)
        if candidates.shape[1] < self.top_k:  # fewer columns than top_k
            missing = self.top_k - candidates.shape[1]
            candidates = torch.cat([candidates, candidates.new_full((len(classes), missing), EMPTY)], 1)
            scores = torch.cat([scores, scores.new_full((len(classes), missing), float("-inf"))], 1)
        update = TableUpdate(classes, candidates, scores)
        return update if pad_to is None else _pad(update, pad_to)


DRAW_SOURCES = ("random", "table", "fallback_empty", "fallback_taken", "capped")


class DoppelgangerTable:
    """``table[c, j]``: the j-th doppelganger of class ``c`` (best first), -1 while unknown.

    The one owner of the table: how it is mined (``mining``), how proposals are merged in (``apply``),
    where the sampler's classes came from (``count_draw``), its per-epoch statistics and its state.
    """

    def __init__(self, num_classes: int, top_k: int = 1, reduction: str = "max") -> None:
        if num_classes < 2:
            raise ValueError(f"doppel table needs at least 2 classes, got num_classes={num_classes}.")
        self.check_settings(top_k, reduction)
        if top_k >= num_classes:
            raise ValueError(f"doppel.top_k={top_k} must be between 1 and num_classes - 1 ({num_classes - 1}).")
        self.num_classes = num_classes
        self.mining = Mining(top_k, reduction)
        # One spare row past the classes: where fixed-shape writes with nothing to write go.
        self._storage = torch.full((num_classes + 1, top_k), EMPTY, dtype=torch.long)
        self._host = self._landing = self._copied = None  # the sampler's copy when the table is on a GPU
        self.draws = dict.fromkeys(DRAW_SOURCES, 0)  # the sampler's classes by source, this epoch
        self.epoch_start: torch.Tensor | None = None  # first doppelgangers when the epoch began

    top_k = property(lambda self: self.mining.top_k)
    reduction = property(lambda self: self.mining.reduction)

    @property
    def table(self) -> torch.Tensor:
        """[num_classes, top_k] on the training device."""
        return self._storage[:-1]

    # -- where it lives ----------------------------------------------------------------------------
    def to_(self, device: torch.device | str) -> DoppelgangerTable:
        """Keep the table on ``device`` (the mining callback puts it where the logits are). On a GPU the
        sampler reads a copy in pinned host memory, refreshed without waiting after every update: it sees
        the table as of the last copy that has landed (:meth:`host_table`)."""
        device = torch.device(device)
        self._storage = self._storage.to(device)
        self._host = self._landing = self._copied = None
        if device.type == "cuda":
            self._host = self._storage[:-1].cpu().pin_memory()
            self._landing = torch.empty_like(self._host).pin_memory()
        return self

    def _publish(self) -> None:
        """Start copying the table to the sampler's landing buffer (no wait; :meth:`host_table` swaps it in)."""
        if self._landing is None:
            return
        self._landing.copy_(self.table, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def host_table(self) -> torch.Tensor:
        """The table the sampler reads, on the host: the table itself on the CPU; on a GPU the latest copy
        that has landed (one step or so behind, on top of the batches the loader has drawn ahead)."""
        if self._host is None:
            return self.table
        if self._copied is not None and self._copied.query():
            self._host, self._landing, self._copied = self._landing, self._host, None
        return self._host

    @staticmethod
    def check_settings(top_k: int, reduction: str) -> None:
        """The checks that need no data (run on the config before anything is loaded)."""
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"doppel.top_k={top_k} must be a positive integer.")
        if reduction not in REDUCTIONS:
            raise ValueError(f"doppel.reduction={reduction!r} is not one of {REDUCTIONS}.")

    def propose(self, logits: torch.Tensor, labels: torch.Tensor, pad_to: int | None = None) -> TableUpdate:
        """Proposals from full-width logits [B, C] (see :meth:`Mining.propose`)."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the table {self.num_classes}.")
        return self.mining.propose(logits, labels, pad_to=pad_to)

    def apply(self, update: TableUpdate) -> None:
        """Write proposals into the table, replacing the rows of the proposed classes.

        A class proposed by several rows (one per process under DDP) gets the best ``top_k`` of all its
        rows' candidates, each candidate scored by its highest proposal. With ``reduction="max"`` this is
        exactly the proposal of one process that saw the whole global batch: a class's global top-k
        candidates are each in the top-k of the rank that gave them their best score.
        """
        size, k = self.num_classes, self.top_k
        classes = update.classes
        # (class, candidate, score) triples, fixed in number: a padding row or an empty slot scores -inf.
        cls = classes[:, None].expand_as(update.candidates).flatten()
        cand, score = update.candidates.flatten(), update.scores.flatten()
        known = (cls >= 0) & (cand >= 0)
        score = score.masked_fill(~known, float("-inf"))
        key = torch.where(known, cls * size + cand, -1)
        # One triple per (class, candidate): its best score; the others drop to -inf.
        order = torch.argsort(score, stable=True)
        order = order[torch.argsort(key[order], stable=True)]  # by key, best last
        sorted_key = key[order]
        last = torch.ones_like(known)
        last[:-1] = sorted_key[1:] != sorted_key[:-1]
        best = torch.zeros_like(known).scatter_(0, order, last)
        score = score.masked_fill(~best, float("-inf"))
        # Each class's candidates by decreasing score (ties: smaller candidate first), the first top_k kept.
        order = order[torch.argsort(score[order], descending=True, stable=True)]
        order = order[torch.argsort(cls[order], stable=True)]
        cls, cand, score = cls[order], cand[order], score[order]
        starts = torch.ones_like(known)
        starts[1:] = cls[1:] != cls[:-1]
        positions = torch.arange(len(cls), device=cls.device)
        slot = positions - torch.cummax(torch.where(starts, positions, 0), 0).values
        write = (slot < k) & (score > float("-inf"))
        # Rows of the proposed classes start empty; writes aimed nowhere land in the spare last row.
        self._storage.index_fill_(0, torch.where(classes >= 0, classes, size), EMPTY)
        self._storage.index_put_((torch.where(write, cls, size), torch.where(write, slot, 0)), cand)
        self._publish()

    def doppelgangers(self, cls: int) -> list[int]:
        """Known doppelgangers of ``cls``, best first."""
        return [c for c in self.host_table()[cls].tolist() if c != EMPTY]

    def first(self) -> torch.Tensor:
        """Per class, its most similar doppelganger (``EMPTY`` until mined); a view of the table."""
        return self.table[:, 0]

    def filled_fraction(self) -> float:
        return (self.first() != EMPTY).float().mean().item()

    def pointed_to(self) -> torch.Tensor:
        """Per class, how many identities have it as their first doppelganger."""
        first = self.first()
        return torch.bincount(first[first != EMPTY], minlength=self.num_classes)

    def hubs(self, n: int = 5) -> list[tuple[int, int]]:
        """The ``n`` classes that are the first doppelganger of the most identities: (class, count)."""
        counts = self.pointed_to()
        top = counts.topk(min(n, self.num_classes))
        return [(c, k) for c, k in zip(top.indices.tolist(), top.values.tolist()) if k > 0]

    # -- statistics --------------------------------------------------------------------------
    def count_draw(self, source: str, classes: int = 1) -> None:
        """The sampler took ``classes`` batch classes from ``source`` (one of ``DRAW_SOURCES``)."""
        self.draws[source] += classes

    def start_epoch(self) -> None:
        self.epoch_start = self.first().clone()

    def end_epoch(self, lookalikes: list[set[int]] | None = None) -> dict[str, float]:
        """The epoch's ``doppel/*`` metrics: fill, churn since :meth:`start_epoch`, the share of batch
        classes the sampler took from the table (its counts then start again: the next epoch's batches are
        drawn after this), the top hub's count and, where the data knows which classes look alike, the
        look-alike share and what chance would score."""
        first = self.first()
        metrics = {"doppel/table_filled": self.filled_fraction()}
        if self.epoch_start is not None:
            metrics["doppel/churn"] = (first != self.epoch_start).float().mean().item()
        drawn = sum(self.draws.values())
        if drawn:
            metrics["doppel/from_table"] = self.draws["table"] / drawn
        if lookalikes is not None:
            judged = lookalike_share(first, lookalikes)
            if judged is not None:
                metrics["doppel/lookalike_share"], metrics["doppel/lookalike_chance"] = judged
        hubs = self.hubs(1)
        metrics["doppel/hub_count"] = float(hubs[0][1]) if hubs else 0.0
        self.draws = dict.fromkeys(DRAW_SOURCES, 0)
        return metrics

    def checksum(self) -> torch.Tensor:
        """A number that differs between two different tables (positions weighted), to compare processes."""
        positions = torch.arange(1, self.table.numel() + 1, dtype=torch.float64, device=self.table.device)
        return (self.table.flatten().to(torch.float64) * positions).sum()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"table": self.table.to("cpu", copy=True), "reduction": self.reduction, "draws": dict(self.draws),
                "epoch_start": None if self.epoch_start is None else self.epoch_start.to("cpu", copy=True)}

    def load_state_dict(self, state: dict) -> None:
        table = state["table"]
        if table.shape != self.table.shape:
            raise ValueError(
                f"checkpoint doppelganger table has shape {tuple(table.shape)}, this run needs "
                f"{tuple(self.table.shape)}: the dataset's class count or doppel.top_k differs."
            )
        self.table.copy_(table)
        self._publish()
        self.draws = {**dict.fromkeys(DRAW_SOURCES, 0), **state.get("draws", {})}
        start = state.get("epoch_start")
        self.epoch_start = None if start is None else start.to(self.table.device)


def lookalike_share(first: torch.Tensor, lookalikes: list[set[int]]) -> tuple[float, float] | None:
    """Over classes with a doppelganger (``first`` >= 0) and a known look-alike: the share whose first
    doppelganger is a known look-alike, and the mean share of the other classes that are (a random pick's
    expected score). None when no class qualifies."""
    judged = [(cls, int(other)) for cls, other in enumerate(first.tolist()) if other >= 0 and lookalikes[cls]]
    if not judged:
        return None
    hits = sum(other in lookalikes[cls] for cls, other in judged)
    chance = sum(len(lookalikes[cls]) for cls, _ in judged) / (len(lookalikes) - 1)
    return hits / len(judged), chance / len(judged)


def _row_best(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``top_k`` best columns other than its target's, and their logits.

    Enough to mine a class by max over its rows: a candidate among the class's top-k is, in the row where
    it scores its maximum, beaten by fewer than k other non-target columns (each of those would score
    higher for the class), so it is in that row's top-k.
    """
    if top_k == 1:  # one max pass over [B, C']
        scores, columns = _max_excluding_target(logits, targets)
        return scores[:, None], columns[:, None]
    row_scores, row_columns = logits.topk(min(top_k + 1, logits.shape[1]), dim=1)
    row_scores = row_scores.masked_fill(row_columns == targets[:, None], float("-inf"))
    scores, slot = row_scores.topk(min(top_k, row_scores.shape[1]), dim=1)
    return scores, row_columns.gather(1, slot)


def _max_excluding_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's highest logit other than its target column's (-1: none here), and its column.

    The target logits are masked in place and restored afterwards: a masked copy of a [B, 100000] matrix
    would cost as much as the max itself. Safe inside the loss's forward because no backward reads the
    logits themselves (softmax saves its output); a term whose backward did would fail loudly at backward
    (autograd's in-place check), never silently.
    """
    columns = targets.clamp_min(0)[:, None]
    kept = logits.gather(1, columns)
    logits.scatter_(1, columns, torch.where(targets[:, None] >= 0, float("-inf"), kept))
    try:
        return logits.max(dim=1)
    finally:
        logits.scatter_(1, columns, kept)


def _pad(update: TableUpdate, rows: int) -> TableUpdate:
    missing = rows - len(update.classes)
    if missing < 0:
        raise ValueError(f"cannot pad {len(update.classes)} proposals to {rows} rows.")
    k = update.candidates.shape[1]
    return TableUpdate(
        torch.cat([update.classes, update.classes.new_full((missing,), EMPTY)]),
        torch.cat([update.candidates, update.candidates.new_full((missing, k), EMPTY)]),
        torch.cat([update.scores, update.scores.new_full((missing, k), float("-inf"))]),
    )
