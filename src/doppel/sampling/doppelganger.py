"""The doppelganger table: for every training identity, its most similar other identities.

Sec. 3.2 of the Doppelganger paper: after each training step, for each class in the mini-batch the
highest-scoring *other* class of the prototype loss's logits becomes its doppelganger. The logits are
already computed by the loss, so mining costs one masked top-k over a B x C matrix and no forward pass.

An update is split in two so that several processes can share one table:
``propose`` turns one step's logits into a fixed-size :class:`TableUpdate` (padded to the batch size,
so it can be all-gathered), and ``apply`` writes any number of gathered updates, merging the candidates of
a class proposed by several processes, so every rank that applies the same updates ends with the same
table, and that table is the one a single process would mine from the whole global batch.
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
    def cat(updates: list[TableUpdate]) -> TableUpdate:
        return TableUpdate(
            torch.cat([u.classes for u in updates]),
            torch.cat([u.candidates for u in updates]),
            torch.cat([u.scores for u in updates]),
        )


class DoppelgangerTable:
    """``table[c, j]``: the j-th doppelganger of class ``c`` (best first), -1 while unknown."""

    def __init__(self, num_classes: int, top_k: int = 1, reduction: str = "max") -> None:
        if num_classes < 2:
            raise ValueError(f"doppel table needs at least 2 classes, got num_classes={num_classes}.")
        self.check_settings(top_k, reduction)
        if top_k >= num_classes:
            raise ValueError(f"doppel.top_k={top_k} must be between 1 and num_classes - 1 ({num_classes - 1}).")
        self.num_classes = num_classes
        self.top_k = top_k
        self.reduction = reduction
        self.table = torch.full((num_classes, top_k), EMPTY, dtype=torch.long)

    @staticmethod
    def check_settings(top_k: int, reduction: str) -> None:
        """The checks that need no data (run on the config before anything is loaded)."""
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"doppel.top_k={top_k} must be a positive integer.")
        if reduction not in REDUCTIONS:
            raise ValueError(f"doppel.reduction={reduction!r} is not one of {REDUCTIONS}.")

    def propose(self, logits: torch.Tensor, labels: torch.Tensor, pad_to: int | None = None) -> TableUpdate:
        """The doppelganger proposals of one step, from its classifier logits [B, C] and labels [B].

        ``reduction="max"``: a class's score for candidate c is the highest logit any of its examples
        gave c; ``"mean"``: the mean over its examples. The class itself is never a candidate.
        """
        logits = logits.detach()
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the table {self.num_classes}.")
        classes, inverse = torch.unique(labels, return_inverse=True)
        if self.reduction == "max":
            scores, candidates = self._propose_max(logits, labels, classes, inverse)
        else:
            counts = torch.bincount(inverse, minlength=len(classes)).to(logits.dtype)
            per_class = logits.new_zeros(len(classes), self.num_classes).index_add_(0, inverse, logits)
            per_class /= counts[:, None]
            per_class.scatter_(1, classes[:, None], float("-inf"))
            scores, candidates = per_class.topk(self.top_k, dim=1)
        update = TableUpdate(classes, candidates, scores)
        if pad_to is not None:
            update = _pad(update, pad_to)
        return update

    def _propose_max(self, logits, labels, classes, inverse):
        if self.top_k == 1:
            # One max pass over [B, C]: each example's best other class, then each class's best example.
            scores, candidates = _max_excluding_target(logits, labels)
            best = _best_rows(labels, scores)
            return scores[best, None], candidates[best, None]
        # A class's top-k candidates by max-over-examples are always among its examples' top-(k+1)
        # logits (at most k - 1 better candidates plus the class itself can outrank one in its row),
        # so one top-k pass over [B, C] suffices and nothing of size [U, C] is built.
        row_scores, row_candidates = logits.topk(self.top_k + 1, dim=1)
        pool, pool_index = torch.unique(row_candidates, return_inverse=True)
        per_class = logits.new_full((len(classes), len(pool)), float("-inf"))
        flat = inverse[:, None] * len(pool) + pool_index
        per_class.view(-1).scatter_reduce_(0, flat.flatten(), row_scores.flatten(), "amax")
        per_class[pool[None, :] == classes[:, None]] = float("-inf")
        scores, slot = per_class.topk(self.top_k, dim=1)
        return scores, pool[slot]

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

    def state_dict(self) -> dict:
        return {"table": self.table.clone(), "reduction": self.reduction}

    def load_state_dict(self, state: dict) -> None:
        table = state["table"]
        if table.shape != self.table.shape:
            raise ValueError(
                f"checkpoint doppelganger table has shape {tuple(table.shape)}, this run needs "
                f"{tuple(self.table.shape)}: the dataset's class count or doppel.top_k differs."
            )
        self.table.copy_(table)


def _best_rows(keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Index of the highest-scoring row of each distinct key, in increasing key order."""
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(keys[order], stable=True)]
    sorted_keys = keys[order]
    last = torch.ones_like(sorted_keys, dtype=torch.bool)
    last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    return order[last]


def _max_excluding_target(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's highest logit other than its label's, and its class.

    The target logits are masked in place and restored afterwards: a masked copy of a
    [B, 100000] matrix would cost as much as the max itself. Call only once backward has run.
    """
    rows = torch.arange(len(labels), device=logits.device)
    target = logits[rows, labels].clone()
    logits[rows, labels] = float("-inf")
    try:
        return logits.max(dim=1)
    finally:
        logits[rows, labels] = target


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
