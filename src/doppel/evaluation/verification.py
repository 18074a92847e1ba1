"""Face verification on pairs (LFW, CFP-FP, AgeDB-30 ``.bin`` packs): 10-fold accuracy as InsightFace's
``verification.evaluate`` computes it.

Embeddings (each already the sum of the image's and its mirror's, the "flip" fusion) are L2-normalised;
a pair's distance is the squared L2 distance; thresholds are 0, 0.01, ..., 3.99; the pairs are split into
10 contiguous folds (scikit-learn's unshuffled KFold: the first ``pairs % 10`` folds one pair larger); in
each fold the threshold with the best accuracy on the other 9 folds (the first of equals) is applied to
it. Reported: the mean and the standard deviation (ddof 0) of the 10 fold accuracies, and the mean of
the 10 chosen thresholds; besides, TAR at FAR = 1e-3 / 1e-4 on cosine similarity and the ROC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from doppel.data.readers.verification_bin import VerificationPairs, read_verification_bin
from doppel.evaluation.protocol import DataFacts, Inputs, Protocol, Result

THRESHOLDS = torch.from_numpy(np.arange(0, 4, 0.01))  # numpy's values, as InsightFace uses them


def fold_bounds(count: int, folds: int) -> list[tuple[int, int]]:
    """[start, stop) of each contiguous fold, the first ``count % folds`` one larger."""
    sizes = [count // folds + (1 if f < count % folds else 0) for f in range(folds)]
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def verification_accuracy(embeddings: torch.Tensor, issame: torch.Tensor, folds: int = 10) -> dict[str, float]:
    """``embeddings``: [2P, D], pair i = rows 2i and 2i + 1; ``issame``: bool [P]."""
    if len(embeddings) != 2 * len(issame) or len(issame) < folds:
        raise ValueError(f"{len(embeddings)} embeddings for {len(issame)} pairs: verification needs 2 per pair and "
                         f"at least {folds} pairs.")
    unit = F.normalize(embeddings.double(), dim=1)
    distance = (unit[0::2] - unit[1::2]).square().sum(1)
    correct = (distance[None, :] < THRESHOLDS[:, None]) == issame.bool()[None, :]  # [thresholds, pairs]
    accuracies, thresholds = [], []
    for start, stop in fold_bounds(len(issame), folds):
        held_out = torch.zeros(len(issame), dtype=torch.bool)
        held_out[start:stop] = True
        best = int(torch.argmax(correct[:, ~held_out].double().mean(1)))  # the first of equal maxima
        accuracies.append(correct[best, held_out].double().mean())
        thresholds.append(float(THRESHOLDS[best]))
    accuracy = torch.stack(accuracies)
    return {"accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std(unbiased=False)),
            "threshold": float(np.mean(thresholds))}


def tar_at_far(scores: torch.Tensor, issame: torch.Tensor, far: float) -> float:
    """True accept rate at a false accept rate of at most ``far``: the share of genuine pairs scoring above
    the lowest threshold that accepts at most ``far`` of the impostor pairs (higher score = more alike, e.g.
    cosine similarity); the ROC point scikit-learn's ``roc_curve`` gives as max TPR with FPR <= far."""
    issame = issame.bool()
    genuine, impostor = scores[issame].double(), scores[~issame].double()
    if len(genuine) == 0 or len(impostor) == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs; got {len(genuine)} and {len(impostor)}.")
    allowed = int(far * len(impostor) + 1e-9)  # impostors that may be accepted
    if allowed >= len(impostor):
        return 1.0
    # Accept only scores above the (allowed + 1)-th highest impostor: it and its ties are rejected.
    bound = impostor.sort(descending=True).values[allowed]
    return float((genuine > bound).double().mean())


def roc_curve(scores: torch.Tensor, issame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(false accept rate, true accept rate) at every distinct score taken as the lowest accepted one,
    from (0, 0) up to (1, 1)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    ordered, genuine = scores.double()[order], issame.bool()[order]
    step_end = torch.ones(len(ordered), dtype=torch.bool)
    step_end[:-1] = ordered[1:] != ordered[:-1]
    tar = genuine.double().cumsum(0)[step_end] / max(int(genuine.sum()), 1)
    far = (~genuine).double().cumsum(0)[step_end] / max(int((~genuine).sum()), 1)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, far]), torch.cat([zero, tar])


def far_name(far: float) -> str:
    return f"tar@far={far:g}"


class VerificationProtocol(Protocol):
    """Face verification on every pair set given (``packs``: paths, or names in the data folder) or found
    (``packs: null``: every ``*.bin`` under ``root``, by default the data folder); metrics are named
    ``<pack>/accuracy`` after each file (lfw, cfp_fp, agedb_30)."""

    def __init__(self, packs: list[str] | None = None, root: str | None = None, flip: bool = True,
                 folds: int = 10, fars: tuple[float, ...] = (1e-3, 1e-4)) -> None:
        if not isinstance(folds, int) or folds < 2:
            raise ValueError(f"eval.verification.folds={folds} must be an integer >= 2.")
        for far in fars:
            if not 0 < far < 1:
                raise ValueError(f"eval.verification.fars: {far} must be in (0, 1).")
        self.given, self.root, self.flip, self.folds, self.fars = packs, root, flip, folds, tuple(fars)
        self.paths: list[Path] = []
        self.pairs: dict[str, VerificationPairs] = {}
        self.headline = "lfw/accuracy"

    def bind(self, facts: DataFacts) -> None:
        if self.given is not None:
            self.paths = [self._locate(str(p), facts) for p in self.given]
        else:
            root = Path(self.root).expanduser() if self.root is not None else facts.folder
            if root is None or not root.is_dir():
                raise FileNotFoundError(f"eval.verification.root={self.root}: no folder to search for .bin packs; "
                                        "set eval.verification.root or eval.verification.packs.")
            self.paths = sorted(root.rglob("*.bin"))
            if not self.paths:
                raise FileNotFoundError(f"eval.verification: no .bin pack under {root}; put lfw.bin, cfp_fp.bin, "
                                        "agedb_30.bin there or list them in eval.verification.packs.")
        names = [verification_name(p) for p in self.paths]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.verification: two packs are named alike ({sorted(names)}): the file names "
                             "(without .bin) name their metrics and must differ.")
        self.pairs = {name: read_verification_bin(path) for name, path in zip(names, self.paths)}
        for pairs in self.pairs.values():
            if len(pairs.issame) < self.folds:
                raise ValueError(f"{pairs.source}: {len(pairs.issame)} pairs, fewer than the {self.folds} folds.")
            genuine = int(pairs.issame.sum())
            if genuine in (0, len(pairs.issame)):
                kind = "impostor (different-identity)" if genuine else "genuine (same-identity)"
                raise ValueError(f"{pairs.source}: all {len(pairs.issame)} pairs are "
                                 f"{'genuine' if genuine else 'impostor'}: a verification pack needs {kind} pairs "
                                 "too (a threshold, accuracy and TAR@FAR need both); check the pack's issame list.")
        self.headline = f"{names[0]}/accuracy"

    def _locate(self, pack: str, facts: DataFacts) -> Path:
        """A pack named in ``packs``: a relative name is looked up in ``root`` when it is set, else as given
        or in the data folder."""
        if self.root is None or Path(pack).is_absolute():
            return facts.locate(pack, "eval.verification.packs")
        candidate = Path(self.root).expanduser() / pack
        if not candidate.is_file():
            raise FileNotFoundError(f"eval.verification.packs: {pack!r} is not in eval.verification.root "
                                    f"({candidate} does not exist).")
        return candidate

    def pair_sets(self) -> dict[str, VerificationPairs]:
        return self.pairs

    def metric_names(self) -> list[str]:
        names = list(self.pairs) if self.pairs else [verification_name(Path(p)) for p in self.given or []]
        return [f"{name}/{metric}" for name in names
                for metric in ("accuracy", "accuracy_std", "threshold", *(far_name(f) for f in self.fars))]

    def evaluate(self, inputs: Inputs) -> Result:
        metrics: dict[str, float] = {}
        rocs: dict[str, tuple[torch.Tensor, torch.Tensor, dict[float, float]]] = {}
        for name, pairs in self.pairs.items():
            unit = inputs.pairs[name].fused(self.flip)
            results = verification_accuracy(unit, pairs.issame, self.folds)
            scores = (unit[0::2].double() * unit[1::2].double()).sum(1)  # cosine = 1 - squared distance / 2
            tars = {far: tar_at_far(scores, pairs.issame, far) for far in self.fars}
            results.update({far_name(far): tar for far, tar in tars.items()})
            rocs[name] = (*roc_curve(scores, pairs.issame), tars)
            metrics.update({f"{name}/{k}": v for k, v in results.items()})
        return Result(metrics, rocs)

    def figures(self, result: Result) -> list[tuple[str, Any]]:
        from doppel.evaluation.plots import roc_figure

        return [("roc", roc_figure(result.curves))] if result.curves else []

    def summary(self, metrics: dict[str, float]) -> list[str]:
        rows = []
        for name in self.pairs:
            tars = ", ".join(f"TAR@FAR={far:g} {100 * metrics[f'{name}/{far_name(far)}']:.2f}%" for far in self.fars)
            rows.append(f"{name}: {self.folds}-fold accuracy {100 * metrics[f'{name}/accuracy']:.2f}% +- "
                        f"{100 * metrics[f'{name}/accuracy_std']:.2f}% (threshold {metrics[f'{name}/threshold']:.2f}); "
                        f"{tars}")
        return rows


def verification_name(path: Path) -> str:
    """The metric name of a pack: its file name without ``.bin`` (``lfw``, ``cfp_fp``, ``agedb_30``)."""
    return Path(path).name.removesuffix(".bin")
