"""Retrieval and clustering, the SEC paper's deep metric learning protocol (Table 3; Song et al.'s
CUB / Cars / SOP protocol, Liu et al.'s In-Shop protocol).

The test classes are searched: leave-one-out among all their images (CUB, Cars, SOP: each image queries
all the others, itself masked by index), or queries against a gallery where the files name one (In-Shop:
``Part.QUERY`` against ``Part.REFERENCE``). A dataset without test classes is searched among its held-out
images. Reported: Recall@K for the benchmark's K list, precision@1, R-precision and MAP@R (Musgrave et
al.: R = the query's same-class items, however many), and NMI and pairwise F1 of a k-means clustering of
the test images with K = the number of test classes. Cosine similarity on L2-normalised embeddings, no
mirror fusion by default (the DML papers embed the centre crop once).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from doppel.data.dataset import Part, in_parts
from doppel.evaluation.metrics import clustering_metrics, kmeans, retrieval_metrics
from doppel.evaluation.protocol import DataFacts, Inputs, Protocol, Result

# Each benchmark's K list as its papers report it.
BENCHMARK_KS = {"cub": (1, 2, 4, 8, 16, 32), "cars": (1, 2, 4, 8, 16, 32), "sop": (1, 10, 100, 1000),
                "inshop": (1, 10, 20, 30, 40, 50)}
DEFAULT_KS = (1, 2, 4, 8, 16, 32)
MODES = ("auto", "leave_one_out", "query_gallery")


class RetrievalProtocol(Protocol):
    headline = "retrieval/recall@1"

    def __init__(self, ks: list[int] | str = "auto", mode: str = "auto", clustering: bool = True,
                 flip: bool = False, seed: int = 0, chunk: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"eval.retrieval.mode={mode!r} must be one of {', '.join(MODES)}.")
        if ks != "auto" and (not ks or any(not isinstance(k, int) or k < 1 for k in ks)):
            raise ValueError(f"eval.retrieval.ks={ks} must be auto or a list of positive integers.")
        self.given_ks, self.mode, self.clustering, self.flip = ks, mode, clustering, flip
        self.seed, self.chunk = seed, chunk
        self.ks: tuple[int, ...] = DEFAULT_KS if ks == "auto" else tuple(ks)
        self.searched: set[Part] = {Part.REFERENCE, Part.QUERY}

    def bind(self, facts: DataFacts) -> None:
        if self.given_ks == "auto":
            self.ks = BENCHMARK_KS.get(facts.benchmark or "", DEFAULT_KS)
        test_classes = facts.has(Part.REFERENCE) or facts.has(Part.QUERY)
        self.searched = {Part.REFERENCE, Part.QUERY} if test_classes else {Part.HELD_OUT}
        if not test_classes and not facts.has(Part.HELD_OUT):
            raise ValueError("eval.retrieval: the split has no test classes and no held-out images to search; set "
                             "data.novel_fraction > 0 or data.base_queries=true.")
        if self.mode == "auto":
            self.mode = "query_gallery" if test_classes and facts.references_given else "leave_one_out"
        if self.mode == "query_gallery" and not (facts.has(Part.REFERENCE) and facts.has(Part.QUERY)):
            raise ValueError("eval.retrieval.mode=query_gallery needs query and gallery (reference) images of the "
                             "test classes; use mode=leave_one_out.")
        if facts.labels is not None:
            self._check_retrievable(facts)

    def _check_retrievable(self, facts: DataFacts) -> None:
        """A query whose class has no other searched image has nothing to find: such queries are left out
        of Recall@K and MAP@R (counted here); none left to score is an error, not a NaN metric."""
        searched = in_parts(facts.parts, self.searched)
        if self.mode == "query_gallery":
            queries = facts.labels[facts.parts == Part.QUERY]
            findable = torch.isin(queries, facts.labels[facts.parts == Part.REFERENCE])
        else:
            queries = facts.labels[searched]
            _, inverse, counts = torch.unique(queries, return_inverse=True, return_counts=True)
            findable = counts[inverse] > 1
        if not findable.any():
            raise ValueError(f"eval.retrieval: none of the {len(queries)} queries has another image of its class to "
                             "retrieve (every test class has one image): Recall@K and MAP@R are undefined; choose "
                             "eval=prototype, or data with two or more images per test class.")
        if not findable.all():
            warnings.warn(f"eval.retrieval: {int((~findable).sum())} of {len(queries)} queries have no other image of "
                          "their class to retrieve and are left out of Recall@K and MAP@R.", stacklevel=2)

    def parts(self) -> set[Part]:
        return set(self.searched)

    def metric_names(self) -> list[str]:
        names = [f"recall@{k}" for k in self.ks] + ["precision@1", "r_precision", "map@r"]
        names += ["nmi", "f1"] if self.clustering else []
        return [f"retrieval/{name}" for name in names]

    def evaluate(self, inputs: Inputs) -> Result:
        split = inputs.split.of_parts(self.searched)
        embeddings = split.fused(self.flip)
        if self.mode == "query_gallery":
            query, gallery = split.parts == Part.QUERY, split.parts == Part.REFERENCE
            metrics = retrieval_metrics(embeddings[query], split.labels[query], embeddings[gallery],
                                        split.labels[gallery], ks=self.ks, chunk=self.chunk)
        else:
            metrics = retrieval_metrics(embeddings, split.labels, ks=self.ks, chunk=self.chunk)
        if self.clustering:
            classes = int(torch.unique(split.labels).numel())
            generator = torch.Generator().manual_seed(self.seed)
            metrics.update(clustering_metrics(split.labels, kmeans(embeddings, classes, generator)))
        recalls = {k: metrics[f"recall@{k}"] for k in self.ks}
        return Result({f"retrieval/{name}": value for name, value in metrics.items()}, {"recall_at_k": recalls})

    def figures(self, result: Result) -> list[tuple[str, Any]]:
        from doppel.evaluation.plots import recall_bars_figure

        recalls = result.curves.get("recall_at_k")
        return [("recall_at_k", recall_bars_figure(recalls))] if recalls else []
