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
        classes, inverse = torch.unique(labels, return_inverse=True)
        width = logits.shape[1]
        if self.reduction == "max":
            scores, candidates = _propose_max(logits, targets, len(classes), inverse, self.top_k)
        else:
            counts = torch.bincount(inverse, minlength=len(classes)).to(logits.dtype)
            per_class = logits.new_zeros(len(classes), width).index_add_(0, inverse, logits)
            per_class /= counts[:, None]
            own = targets.new_full((len(classes),), -1).scatter_(0, inverse, targets)  # a class's own column
            held = own >= 0
            per_class[held.nonzero().squeeze(1), own[held]] = float("-inf")
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
        self.table = torch.full((num_classes, top_k), EMPTY, dtype=torch.long)
        self.draws = dict.fromkeys(DRAW_SOURCES, 0)  # the sampler's classes by source, this epoch
        self.epoch_start: torch.Tensor | None = None  # first doppelgangers when the epoch began

    top_k = property(lambda self: self.mining.top_k)
    reduction = property(lambda self: self.mining.reduction)

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
        valid = update.classes >= 0
        if not valid.any():
            return
        device = self.table.device
        classes = update.classes[valid].to(device)
        candidates, scores = update.candidates[valid].to(device), update.scores[valid].to(device)
        # (class, candidate, score) triples; one per (class, candidate), with its best score.
        cls = classes[:, None].expand_as(candidates).flatten()
        cand, score = candidates.flatten(), scores.flatten()
        known = cand != EMPTY
        cls, cand, score = cls[known], cand[known], score[known]
        best = _best_rows(cls * self.num_classes + cand, score)
        cls, cand, score = cls[best], cand[best], score[best]
        # Each class's candidates by decreasing score (stable: one row's order is kept), the first top_k kept.
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(cls[order], stable=True)]
        cls, cand = cls[order], cand[order]
        starts = torch.ones_like(cls, dtype=torch.bool)
        starts[1:] = cls[1:] != cls[:-1]
        run_start = torch.cummax(torch.where(starts, torch.arange(len(cls), device=device), 0), 0).values
        slot = torch.arange(len(cls), device=device) - run_start
        keep = slot < self.top_k
        self.table[classes.unique()] = EMPTY
        self.table[cls[keep], slot[keep]] = cand[keep]

    def doppelgangers(self, cls: int) -> list[int]:
        """Known doppelgangers of ``cls``, best first."""
        return [c for c in self.table[cls].tolist() if c != EMPTY]

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
        positions = torch.arange(1, self.table.numel() + 1, dtype=torch.float64)
        return (self.table.flatten().to(torch.float64) * positions).sum()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"table": self.table.clone(), "reduction": self.reduction, "draws": dict(self.draws),
                "epoch_start": None if self.epoch_start is None else self.epoch_start.clone()}

    def load_state_dict(self, state: dict) -> None:
        table = state["table"]
        if table.shape != self.table.shape:
            raise ValueError(
                f"checkpoint doppelganger table has shape {tuple(table.shape)}, this run needs "
                f"{tuple(self.table.shape)}: the dataset's class count or doppel.top_k differs."
            )
        self.table.copy_(table)
        self.draws = {**dict.fromkeys(DRAW_SOURCES, 0), **state.get("draws", {})}
        self.epoch_start = state.get("epoch_start")


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


def _propose_max(logits: torch.Tensor, targets: torch.Tensor, n_classes: int, inverse: torch.Tensor,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's ``top_k`` columns by max-over-its-examples, its own column excluded.

    A class's top-k candidates are always among its examples' top-(k+1) logits (at most k - 1 better
    candidates plus the class itself can outrank one in its row), so one top-k pass over [B, C'] suffices
    and nothing of size [classes, C'] is built.
    """
    width = logits.shape[1]
    if top_k == 1:  # one max pass over [B, C']: each row's best other column, then each class's best row
        scores, columns = _max_excluding_target(logits, targets)
        best = _best_rows(inverse, scores)
        return scores[best, None], columns[best, None]
    row_scores, row_columns = logits.topk(min(top_k + 1, width), dim=1)
    row_scores = row_scores.masked_fill(row_columns == targets[:, None], float("-inf"))
    pool, pool_index = torch.unique(row_columns, return_inverse=True)
    per_class = logits.new_full((n_classes, len(pool)), float("-inf"))
    flat = inverse[:, None] * len(pool) + pool_index
    per_class.view(-1).scatter_reduce_(0, flat.flatten(), row_scores.flatten(), "amax")
    scores, slot = per_class.topk(min(top_k, len(pool)), dim=1)
    return scores, pool[slot]


def _best_rows(keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Index of the highest-scoring row of each distinct key, in increasing key order."""
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(keys[order], stable=True)]
    sorted_keys = keys[order]
    last = torch.ones_like(sorted_keys, dtype=torch.bool)
    last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    return order[last]


def _max_excluding_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's highest logit other than its target column's (-1: none here), and its column.

    The target logits are masked in place and restored afterwards: a masked copy of a [B, 100000] matrix
    would cost as much as the max itself. Safe inside the loss's forward because no backward reads the
    logits themselves (softmax saves its output); a term whose backward did would fail loudly at backward
    (autograd's in-place check), never silently.
    """
    rows = (targets >= 0).nonzero().squeeze(1)
    columns = targets[rows]
    kept = logits[rows, columns].clone()
    logits[rows, columns] = float("-inf")
    try:
        return logits.max(dim=1)
    finally:
        logits[rows, columns] = kept


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
