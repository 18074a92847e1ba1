"""Chunked nearest-neighbour retrieval, spread over the processes of a run.

Process 0 scores the protocols. While it does (:func:`spread_over_processes`), the other processes wait in
:func:`serve` for its retrieval requests: a request's queries and gallery are broadcast once, every process
computes the query chunks ``i`` with ``i % world == rank`` on its own device, and the per-chunk sums are
reduced to process 0, which adds them in chunk order. Every chunk's row is filled by one process and zero
on the others, so the reduction is exact and the metrics are bit-identical to one process's on the same
kind of device, whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from doppel import distributed

SIMILARITY_BUDGET = 2**26  # similarities held at once per process (256 MB in float32)


@dataclass
class Request:
    """Retrieval by cosine similarity of ``queries`` against ``gallery`` (None: leave-one-out among the
    queries), as :func:`doppel.evaluation.metrics.retrieval_metrics` defines its metrics."""

    queries: torch.Tensor
    query_labels: torch.Tensor
    gallery: torch.Tensor | None
    gallery_labels: torch.Tensor | None
    ks: tuple[int, ...]
    at_r: bool
    chunk: int | None

    def empty_rows(self) -> torch.Tensor:
        chunks = len(range(0, len(self.queries), self.chunk_size()))
        return torch.zeros(chunks + 1, len(self.names()) + 1, dtype=torch.float64)

    def chunk_size(self) -> int:
        size = len(self.queries) if self.gallery is None else len(self.gallery)
        return self.chunk or max(64, SIMILARITY_BUDGET // max(size, 1))

    def names(self) -> list[str]:
        return [f"recall@{k}" for k in self.ks] + (["precision@1", "r_precision", "map@r"] if self.at_r else [])

    def chunk_sums(self, owned: int, of: int, device: torch.device) -> torch.Tensor:
        """[chunks + 1, metrics + 1] float64: each chunk's sum of every metric and its count of scored queries,
        in the rows of chunks ``owned``, ``owned + of``, ... (zeros in the others); the last row's first entry
        counts the processes that failed (see :func:`serve`)."""
        leave_one_out = self.gallery is None
        gallery, gallery_labels = (self.queries, self.query_labels) if leave_one_out else \
            (self.gallery, self.gallery_labels)
        chunk = self.chunk_size()
        _, inverse = torch.unique(torch.cat([self.query_labels, gallery_labels]), return_inverse=True)
        counts = torch.bincount(inverse[len(self.query_labels):], minlength=int(inverse.max()) + 1)
        relevant = counts[inverse[:len(self.query_labels)]] - int(leave_one_out)  # R per query
        available = len(gallery) - int(leave_one_out)
        depth = min(max(max(self.ks), int(relevant.max()) if self.at_r and len(relevant) else 0), available)
        starts = range(0, len(self.queries), chunk)
        rows = self.empty_rows()
        if depth < 1:
            return rows
        gallery, gallery_labels = gallery.to(device), gallery_labels.to(device)
        ranks = torch.arange(1, depth + 1, dtype=torch.float64, device=device)
        for row in range(owned, len(starts), of):
            start = starts[row]
            stop = min(start + chunk, len(self.queries))
            keep = (relevant[start:stop] > 0).to(device)
            if not keep.any():
                continue
            sims = self.queries[start:stop].to(device) @ gallery.T
            if leave_one_out:
                sims[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")
            neighbours = sims.topk(depth, dim=1).indices
            hit = (gallery_labels[neighbours] == self.query_labels[start:stop, None].to(device))[keep]
            values = [hit[:, :k].any(dim=1).sum() for k in self.ks]
            if self.at_r:
                r = relevant[start:stop].to(device)[keep].to(torch.float64)
                within_r = ranks[None, :] <= r[:, None]
                precision_at = hit.cumsum(dim=1) / ranks
                values += [hit[:, 0].sum(), ((hit & within_r).sum(dim=1) / r).sum(),
                           ((precision_at * (hit & within_r)).sum(dim=1) / r).sum()]
            values.append(keep.sum())
            rows[row] = torch.stack([v.to(torch.float64) for v in values]).cpu()
        return rows


_serving: dict[str, torch.device] = {}  # on process 0, while the other processes serve: the device


def chunk_sums(request: Request) -> torch.Tensor:
    """[chunks, metrics + 1]: the request's per-chunk sums, computed by every serving process (or by this one
    alone)."""
    device, world = _serving.get("device", torch.device("cpu")), distributed.world()
    if "device" not in _serving or world == 1:
        return request.chunk_sums(0, 1, device)[:-1]
    _send(request)
    try:
        rows, failure = request.chunk_sums(0, world, device), None
    except Exception as error:  # take part in the reduction all the same: the others are waiting in it
        rows, failure = request.empty_rows(), error
    rows = rows.to(distributed.comm_device())
    dist.reduce(rows, dst=0)
    if failure is not None:
        raise failure
    rows = rows.cpu()
    if rows[-1, 0] > 0:
        raise RuntimeError(f"{int(rows[-1, 0])} of the other processes failed computing their retrieval chunks (their "
                           "error is in their log); the metrics would miss those chunks.")
    return rows[:-1]


def _send(request: Request | None) -> None:
    """Process 0: the request's settings as one object, then its tensors (None: no more requests)."""
    header = None if request is None else {
        "ks": request.ks, "at_r": request.at_r, "chunk": request.chunk, "shapes": [
            None if t is None else (tuple(t.shape), t.dtype) for t in
            (request.queries, request.query_labels, request.gallery, request.gallery_labels)]}
    dist.broadcast_object_list([header], src=0)
    if request is not None:
        for tensor in (request.queries, request.query_labels, request.gallery, request.gallery_labels):
            if tensor is not None:
                dist.broadcast(tensor.contiguous().to(distributed.comm_device()), src=0)


def _receive() -> Request | None:
    box: list[dict | None] = [None]
    dist.broadcast_object_list(box, src=0)
    header = box[0]
    if header is None:
        return None
    tensors = []
    for shape in header["shapes"]:
        if shape is None:
            tensors.append(None)
            continue
        tensor = torch.empty(shape[0], dtype=shape[1], device=distributed.comm_device())
        dist.broadcast(tensor, src=0)
        tensors.append(tensor.cpu())
    return Request(*tensors, ks=tuple(header["ks"]), at_r=header["at_r"], chunk=header["chunk"])


@contextmanager
def spread_over_processes(device: torch.device) -> Iterator[None]:
    """Process 0: retrieval inside runs on ``device`` and on the processes serving in :func:`serve`, which it
    releases at the end, however the body ends."""
    _serving["device"] = device
    try:
        yield
    finally:
        del _serving["device"]
        if distributed.world() > 1:
            _send(None)


def serve(device: torch.device) -> None:
    """Every process but 0: compute its chunks of process 0's requests until it has no more. A failure is
    printed here and counted in the reduction, which process 0 then refuses."""
    while (request := _receive()) is not None:
        try:
            rows = request.chunk_sums(distributed.rank(), distributed.world(), device)
        except Exception as error:
            print(f"process {distributed.rank()}: retrieval chunks failed: {error!r}", flush=True)
            rows = request.empty_rows()
            rows[-1, 0] = 1
        dist.reduce(rows.to(distributed.comm_device()), dst=0)
