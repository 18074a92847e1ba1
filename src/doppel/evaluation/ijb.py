"""IJB-B / IJB-C: 1:1 template verification and 1:N template identification, as insightface's
``eval_ijbc.py`` and ``ijb_1n.py`` compute them.

Each face is aligned from its landmarks (:mod:`doppel.data.readers.ijb`) and embedded with its mirror; its
feature is the sum of the two (``flip``), L2-normalised unless ``norm_score`` keeps the norm as a quality
weight, times the detector's score when ``detector_score``. A media's faces are averaged, a template's
medias summed, the template feature L2-normalised; a pair's score is the cosine of its two templates.

1:1: the ROC as scikit-learn's ``roc_curve`` gives it (collinear points dropped); TAR at FAR f is the TAR of
the ROC point whose FAR is nearest to f (of equals, the one with the largest TAR), insightface's rule.
1:N: the galleries (G1 + G2, or S1 + S2) together; rank-k = share of probe templates whose mate is among
the k most similar gallery templates; TPIR at FPIR f = share of probes whose mate scores above the
ceil(f x probes)-th largest non-mate score of all probe-gallery pairs (insightface's definition). Besides,
the open-set protocol as NIST defines it (``open_tpir@fpir``): each gallery searched alone, the probes of the
other gallery's subjects as its non-mated searches, averaged over the two galleries.

At IJB-C's size (469k faces, 23k templates, 15.7M pairs) every step runs in chunks: memory is the face
embeddings, the template features (float64) and the pair scores, never faces x dimension in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from doppel.data.readers.ijb import IJBRelease, read_ijb
from doppel.evaluation.protocol import DataFacts, Embedded, Inputs, Protocol, Result
from doppel.evaluation.verification import far_name

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)
CHUNK_VALUES = 2 ** 21  # float64 values per chunk of faces, pairs or similarities: 16 MB, which malloc reuses
# (2 ** 24 made every chunk a fresh mmap: 3x slower in page faults)


def face_features(item: Embedded, start: int, stop: int, flip: bool, norm_score: bool,
                  detector_scores: torch.Tensor | None) -> torch.Tensor:
    """The features of faces [start, stop) in float64, before pooling."""
    part = Embedded(item.plain[start:stop].double(),
                    None if item.flipped is None else item.flipped[start:stop].double(), blocks=item.blocks)
    features = part.fused(flip, normalise=not norm_score or item.blocks > 1)
    if detector_scores is not None:
        features = features * detector_scores[start:stop, None].double()
    return features


def template_features(item: Embedded, templates: np.ndarray, medias: np.ndarray, flip: bool = True,
                      norm_score: bool = True, detector_scores: np.ndarray | None = None,
                      chunk: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """(template ids ascending, their unit features float64 [T, D]): each template the sum over its medias
    of the mean of the media's face features, L2-normalised."""
    unique, template_index = np.unique(templates, return_inverse=True)
    _, media_index = np.unique(medias, return_inverse=True)
    group = template_index.astype(np.int64) * (int(media_index.max()) + 1) + media_index
    _, group_index, group_size = np.unique(group, return_inverse=True, return_counts=True)
    # mean within a media, then sum over medias = each face weighted by 1 / (its media's faces in the template)
    weight = torch.from_numpy(1.0 / group_size[group_index])
    rows = torch.from_numpy(template_index.astype(np.int64))
    scores = None if detector_scores is None else torch.from_numpy(np.asarray(detector_scores))
    sums = torch.zeros(len(unique), item.plain.shape[1], dtype=torch.float64)
    step = chunk or max(1, CHUNK_VALUES // item.plain.shape[1])
    for start in range(0, len(templates), step):
        stop = min(start + step, len(templates))
        features = face_features(item, start, stop, flip, norm_score, scores)
        sums.index_add_(0, rows[start:stop], features * weight[start:stop, None])
    return unique, F.normalize(sums, dim=1)


def _rows(template_ids: np.ndarray, wanted: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.searchsorted(template_ids, wanted).astype(np.int64))


def pair_scores(features: torch.Tensor, template_ids: np.ndarray, pairs: np.ndarray,
                chunk: int | None = None) -> np.ndarray:
    """Cosine similarity of each template pair (float64)."""
    first, second = _rows(template_ids, pairs[:, 0]), _rows(template_ids, pairs[:, 1])
    scores = np.empty(len(pairs))
    step = chunk or max(1, CHUNK_VALUES // features.shape[1])
    for start in range(0, len(pairs), step):
        a, b = features[first[start:start + step]], features[second[start:start + step]]
        scores[start:start + step] = (a * b).sum(1).numpy()
    return scores


def roc(scores: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) of scikit-learn's ``roc_curve`` with its defaults: one point per distinct score taken as the
    lowest accepted, the inner points of straight runs dropped, (0, 0) first."""
    order = np.argsort(scores, kind="stable")[::-1]
    ordered, truth = scores[order], genuine[order].astype(np.int64)
    ends = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]
    accepted_genuine = np.cumsum(truth)[ends]
    accepted_impostor = 1 + ends - accepted_genuine
    if len(ends) > 2:
        corner = np.r_[True, np.logical_or(np.diff(accepted_impostor, 2), np.diff(accepted_genuine, 2)), True]
        accepted_genuine, accepted_impostor = accepted_genuine[corner], accepted_impostor[corner]
    accepted_genuine, accepted_impostor = np.r_[0, accepted_genuine], np.r_[0, accepted_impostor]
    return accepted_impostor / accepted_impostor[-1], accepted_genuine / accepted_genuine[-1]


def tar_at_far(far: np.ndarray, tar: np.ndarray, at: float) -> float:
    """The TAR of the ROC point whose FAR is nearest to ``at``; of equally near points the last (largest TAR)."""
    distance = np.abs(far[::-1] - at)
    return float(tar[::-1][int(np.argmin(distance))])


def identification(features: torch.Tensor, template_ids: np.ndarray, gallery_templates: np.ndarray,
                   gallery_subjects: np.ndarray, probe_templates: np.ndarray, probe_subjects: np.ndarray,
                   fpirs: tuple[float, ...] = FPIRS, ranks: tuple[int, ...] = RANKS,
                   chunk: int | None = None, gallery_halves: np.ndarray | None = None) -> dict[str, float]:
    """Rank-k and TPIR at FPIR of the probe templates searched in the gallery (every probe's subject has
    exactly one gallery template), in chunks of probes; with ``gallery_halves`` (0 / 1 per gallery template)
    also the open-set TPIR of each half searched alone, averaged (:func:`open_set_tpir`)."""
    gallery = features[_rows(template_ids, gallery_templates)]
    by_subject = {int(s): i for i, s in enumerate(gallery_subjects)}
    mates = torch.tensor([by_subject[int(s)] for s in probe_subjects], dtype=torch.long)
    probes = len(probe_templates)
    needed = [math.ceil(probes * f) for f in fpirs]  # insightface: non-mate scores allowed above the threshold
    if max(needed) > probes * (len(gallery_templates) - 1):
        raise ValueError(f"IJB 1:N: FPIR {max(fpirs)} needs {max(needed)} non-mate scores and {probes} probes x "
                         f"{len(gallery_templates) - 1} non-mates give fewer.")
    probe_rows = _rows(template_ids, probe_templates)
    mate_scores = torch.empty(probes, dtype=torch.float64)
    hits = torch.zeros(len(ranks), dtype=torch.long)
    highest = torch.empty(0, dtype=torch.float64)  # the largest non-mate scores so far
    halves = [] if gallery_halves is None else \
        [torch.nonzero(torch.from_numpy(np.asarray(gallery_halves) == h))[:, 0] for h in (0, 1)]  # their columns
    top_scores = [torch.empty(probes, dtype=torch.float64) for _ in halves]  # per half: each probe's best score
    top_is_mate = [torch.empty(probes, dtype=torch.bool) for _ in halves]
    step = chunk or max(1, CHUNK_VALUES // max(len(gallery_templates), features.shape[1]))
    for start in range(0, probes, step):
        stop = min(start + step, probes)
        similarity = features[probe_rows[start:stop]] @ gallery.T
        own = mates[start:stop]
        mate = similarity.gather(1, own[:, None])[:, 0]
        mate_scores[start:stop] = mate
        above = (similarity > mate[:, None]).sum(1)  # gallery templates ranked before the mate
        hits += torch.stack([(above < k).sum() for k in ranks])
        for half, columns in enumerate(halves):
            best, where = similarity[:, columns].max(dim=1)
            top_scores[half][start:stop] = best
            top_is_mate[half][start:stop] = columns[where] == own
        similarity.scatter_(1, own[:, None], -math.inf)
        pool = torch.cat([highest, similarity.flatten()])
        highest = pool.topk(min(max(needed), len(pool))).values
    metrics = {f"rank{k}": float(hits[i]) / probes for i, k in enumerate(ranks)}
    for fpir, count in zip(fpirs, needed):
        metrics[f"tpir@fpir={fpir:g}"] = float((mate_scores > highest[count - 1]).double().mean())
    if halves:
        mate_half = torch.from_numpy(np.asarray(gallery_halves))[mates]
        for fpir in fpirs:
            metrics[f"open_tpir@fpir={fpir:g}"] = float(np.mean([
                open_set_tpir(top_scores[h], top_is_mate[h], mate_half == h, fpir) for h in range(len(halves))]))
    return metrics


def open_set_tpir(top_scores: torch.Tensor, top_is_mate: torch.Tensor, mated: torch.Tensor, fpir: float) -> float:
    """NIST's open-set identification on one gallery: the threshold lets at most ``fpir`` of the non-mated
    searches (probes whose subject is not in this gallery) score above it with their best candidate; TPIR is the
    share of mated searches whose best candidate is the mate, scoring above it."""
    non_mated = top_scores[~mated].sort(descending=True).values
    allowed = int(fpir * len(non_mated) + 1e-9)
    threshold = non_mated[allowed] if allowed < len(non_mated) else -math.inf
    return float((top_is_mate[mated] & (top_scores[mated] > threshold)).double().mean())


class IJBProtocol(Protocol):
    """IJB-B / IJB-C of insightface's release under ``root``; metrics ``ijbc/tar@far=0.0001``, ...,
    ``ijbc/rank1``, ``ijbc/tpir@fpir=0.01`` (``ijbb/...`` for IJB-B)."""

    def __init__(self, root: str | None = None, target: str = "IJBC", flip: bool = True,
                 detector_score: bool = True, norm_score: bool = True, identification: Any = "auto",
                 fars: tuple[float, ...] = FARS, fpirs: tuple[float, ...] = FPIRS,
                 ranks: tuple[int, ...] = RANKS) -> None:
        for key, value in (("flip", flip), ("detector_score", detector_score), ("norm_score", norm_score)):
            if not isinstance(value, bool):
                raise ValueError(f"eval.ijb.{key}={value} must be true or false.")
        if identification not in ("auto", True, False):
            raise ValueError(f"eval.ijb.identification={identification} must be auto (1:N when the release has its "
                             "CSVs), true or false.")
        for key, rates in (("fars", fars), ("fpirs", fpirs)):
            if not rates or any(not 0 < r < 1 for r in rates):
                raise ValueError(f"eval.ijb.{key}={list(rates)} must list rates in (0, 1).")
        if not ranks or any(not isinstance(k, int) or k < 1 for k in ranks):
            raise ValueError(f"eval.ijb.ranks={list(ranks)} must list positive integers.")
        self.root, self.target, self.flip = root, str(target).upper(), flip
        self.detector_score, self.norm_score = detector_score, norm_score
        self.identification = None if identification == "auto" else identification
        self.fars, self.fpirs, self.ranks = tuple(fars), tuple(fpirs), tuple(ranks)
        self.name = self.target.lower()
        self.release: IJBRelease | None = None
        self.headline = f"{self.name}/{far_name(1e-4 if 1e-4 in self.fars else self.fars[0])}"

    def bind(self, facts: DataFacts) -> None:
        if self.root is None:
            raise ValueError("eval.ijb.root is not set: point it at the folder of insightface's IJB release "
                             f"(eval.ijb.root=/data/IJB_release eval.ijb.target={self.target}).")
        self.release = read_ijb(self.root, self.target, self.identification)

    def pair_sets(self) -> dict[str, Any]:
        return {self.name: self.release} if self.release is not None else {}

    def metric_names(self) -> list[str]:
        names = [far_name(f) for f in self.fars]
        searched = self.identification is not False if self.release is None else self.release.gallery is not None
        if searched:
            names += [f"rank{k}" for k in self.ranks] + [f"tpir@fpir={f:g}" for f in self.fpirs]
            names += [f"open_tpir@fpir={f:g}" for f in self.fpirs]
        return [f"{self.name}/{n}" for n in names]

    def evaluate(self, inputs: Inputs) -> Result:
        release = self.release
        item = inputs.pairs[self.name]
        ids, features = template_features(item, release.templates, release.medias, self.flip, self.norm_score,
                                          release.detector_scores if self.detector_score else None)
        scores = pair_scores(features, ids, release.pairs)
        far, tar = roc(scores, release.genuine)
        tars = {f: tar_at_far(far, tar, f) for f in self.fars}
        metrics = {f"{self.name}/{far_name(f)}": v for f, v in tars.items()}
        if release.gallery is not None:
            found = identification(features, ids, release.gallery.templates, release.gallery.subjects,
                                   release.probes.templates, release.probes.subjects, self.fpirs, self.ranks,
                                   gallery_halves=release.gallery.half)
            metrics.update({f"{self.name}/{k}": v for k, v in found.items()})
        drawn = _decimated(far)
        return Result(metrics, {self.target: (torch.from_numpy(far[drawn]), torch.from_numpy(tar[drawn]), tars)})

    def figures(self, result: Result) -> list[tuple[str, Any]]:
        from doppel.evaluation.plots import roc_figure

        return [("roc", roc_figure(result.curves, title=f"ROC ({self.target} 1:1 templates)"))]

    def summary(self, metrics: dict[str, float]) -> list[str]:
        rows = [f"{self.target} 1:1 TAR (%) at FAR  " + "  ".join(
            f"{f:g}: {100 * metrics[f'{self.name}/{far_name(f)}']:.2f}" for f in self.fars)]
        if f"{self.name}/rank1" in metrics:
            rows.append(f"{self.target} 1:N  " + "  ".join(
                [f"rank-{k}: {100 * metrics[f'{self.name}/rank{k}']:.2f}" for k in self.ranks]
                + [f"TPIR@FPIR={f:g}: {100 * metrics[f'{self.name}/tpir@fpir={f:g}']:.2f}" for f in self.fpirs]))
            rows.append(f"{self.target} 1:N open set, each gallery alone (NIST), mean of the two  " + "  ".join(
                f"TPIR@FPIR={f:g}: {100 * metrics[f'{self.name}/open_tpir@fpir={f:g}']:.2f}" for f in self.fpirs))
        return rows


def _decimated(far: np.ndarray, points: int = 2000) -> np.ndarray:
    """At most ~``points`` ROC points, spread evenly in log FAR (a figure of 15M points is megabytes)."""
    if len(far) <= points:
        return np.arange(len(far))
    grid = np.logspace(-7, 0, points)
    return np.unique(np.r_[0, np.clip(np.searchsorted(far, grid), 0, len(far) - 1), len(far) - 1])
