"""Prototype (classifier) loss terms. Each owns its class weights and proposes doppelgangers from the
logits it computes.

The doppelganger miner reads the scores the prototype loss already computed (sec. 3.2 of the
Doppelganger paper): :meth:`PrototypeTerm.loss_and_proposals` turns them into the step's proposals
inside the forward, so nothing [B, C] outlives the step. Margins change only the target class's logit,
which the miner never reads. The softmax terms over a class-weight matrix can split it across processes
(``classifier.sharded=true``, :mod:`doppel.losses.sharding`).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from doppel.distributed import rank
from doppel.host_syncs import to_device
from doppel.losses import sharding
from doppel.losses.sharding import ClassShard
from doppel.sampling.doppelganger import DoppelgangerTable, Mining, TableUpdate
from doppel.seeding import stable_seed


@dataclass
class ColumnLogits:
    """The logits a term computed: [B, C'] over its columns for the rows ``labels`` (global class ids);
    ``targets`` is each row's own column (-1: not among these columns; None: the labels) and
    ``column_classes`` the class of each column (None: column j is class j)."""

    logits: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None = None
    column_classes: torch.Tensor | None = None


_DEFER_CLASS_INIT = False  # set by deferred_class_init(): class parameters are built on the meta device


@contextmanager
def deferred_class_init(enabled: bool = True) -> Iterator[None]:
    """Terms built inside do not allocate their class parameters (``classifier.sharded``: each process
    later draws only its own rows, :meth:`ShardableSoftmax.defer_class_init_`)."""
    global _DEFER_CLASS_INIT
    previous, _DEFER_CLASS_INIT = _DEFER_CLASS_INIT, enabled
    try:
        yield
    finally:
        _DEFER_CLASS_INIT = previous


def _class_device() -> str | None:
    return "meta" if _DEFER_CLASS_INIT else None


def _uniform_rows(shape: tuple[int, ...], bound: float, generator: torch.Generator,
                  keep: tuple[int, int] | None) -> torch.Tensor | None:
    """What ``torch.empty(shape).uniform_(-bound, bound, generator=generator)`` holds in rows ``keep`` (lo, hi),
    drawn a block of rows at a time (the stream is the same: uniform_ draws element by element), so the
    whole tensor never exists; the generator ends where the whole draw would leave it."""
    per_row = math.prod(shape[1:])
    block = max(1, (1 << 22) // max(1, per_row))
    kept = None if keep is None else torch.empty(keep[1] - keep[0], *shape[1:])  # filled block by block
    for first in range(0, shape[0], block):
        last = min(shape[0], first + block)
        rows = torch.empty(last - first, *shape[1:]).uniform_(-bound, bound, generator=generator)
        if keep is not None and first < keep[1] and last > keep[0]:
            lo, hi = max(keep[0], first), min(keep[1], last)
            kept[lo - keep[0]:hi - keep[0]] = rows[lo - first:hi - first]
    return kept


class PrototypeTerm(nn.Module, ABC):
    """A classifier over ``num_classes`` prototypes.

    Subclasses implement ``loss_and_logits(embeddings, labels) -> (loss, ColumnLogits)``. Those with
    ``shardable`` can hold one process's share of the classes (:meth:`shard_`).
    """

    shardable: ClassVar[bool] = False
    class_parameters: ClassVar[tuple[str, ...]] = ()  # per-class parameters (dim 0 = class), by name

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.sharded = False  # classifier.sharded: split the classes when there are several processes
        self.shard: ClassShard | None = None  # this process's classes, once split

    def check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) for the {type(self).__name__} classifier, got "
                f"[{int(labels.min())}, {int(labels.max())}]: the data's class count and the loss disagree."
            )

    @abstractmethod
    def loss_and_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ColumnLogits]:
        """(loss, the logits the miner reads)."""

    @abstractmethod
    def class_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, C] scores of every class without any margin: the classifier's prediction is their argmax."""

    @abstractmethod
    def class_vectors(self) -> torch.Tensor:
        """[C, D] one vector per class in embedding space (a classifier's weight rows, or the centres):
        what the prototype protocol's ``base_prototypes=classifier`` normalises into base prototypes."""

    def loss_and_proposals(self, embeddings: torch.Tensor, labels: torch.Tensor,
                           mining: Mining | None) -> tuple[torch.Tensor, TableUpdate | None]:
        """The loss and, with ``mining``, the step's doppelganger proposals from the logits just computed
        (one row per row of the batch the logits cover: fixed-size, so they can be gathered). The labels are
        the caller's to check (:meth:`check_labels`): reading them here would make the host wait."""
        loss, view = self.loss_and_logits(embeddings, labels)
        if mining is None:
            return loss, None
        return loss, mining.propose(view.logits, view.labels, view.targets, view.column_classes,
                                    pad_to=len(view.labels))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_labels(labels)
        return self.loss_and_proposals(embeddings, labels, None)[0]

    # -- sharding ------------------------------------------------------------------------------
    def shard_(self, shard: ClassShard) -> None:
        """Keep only ``shard``'s rows of every per-class parameter (the full ones were initialised the same
        on every process, so the shards together are the unsharded classifier)."""
        if not self.shardable:
            raise ValueError(f"classifier.sharded=true: {type(self).__name__} cannot split its classes across "
                             "processes (its loss needs other classes' centres); use classifier.sharded=false.")
        for name, full in self.class_tensors().items():
            self._replace(name, nn.Parameter(full.detach()[shard.lo:shard.hi].clone(),
                                             requires_grad=full.requires_grad))
        self.shard = shard

    def materialize_(self) -> None:
        """Every row of class parameters whose drawing was deferred (none here: see ShardableSoftmax)."""

    def check_sample(self) -> None:
        """Raise about what a step kept on the device to report at the next sync point (nothing here)."""

    def class_tensors(self) -> dict[str, nn.Parameter]:
        """The per-class parameters this term has (``class_parameters`` without an absent bias), by name."""
        tensors = {name: getattr(*self._owner(name)) for name in self.class_parameters}
        return {name: tensor for name, tensor in tensors.items() if tensor is not None}

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, attribute = name.rpartition(".")
        return (self.get_submodule(path) if path else self), attribute

    def _replace(self, name: str, parameter: nn.Parameter) -> None:
        setattr(*self._owner(name), parameter)

    def split(self) -> bool:
        """Whether this process holds a share of the classes (sharded, more than one process)."""
        return self.shard is not None and self.shard.world_size > 1

    def unsharded(self) -> PrototypeTerm | None:
        """The whole classifier on process 0 (None on the others); collective when split. Evaluation scores
        with it: costs one copy of the class parameters on process 0."""
        if not self.split():
            return self
        full = {name: sharding.gather_classes(local.detach(), self.num_classes)
                for name, local in self.class_tensors().items()}
        if rank() != 0:
            return None
        whole = copy.deepcopy(self)
        whole.shard = None
        for name, tensor in full.items():
            whole._replace(name, nn.Parameter(tensor, requires_grad=False))
        return whole


def _linear_bounds(linear: nn.Linear) -> dict[str, float]:
    """nn.Linear.reset_parameters' bounds: kaiming_uniform_(a=sqrt(5)) for the weight, then 1 / sqrt(fan_in)."""
    fan_in = linear.weight.shape[1]
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bounds = {"classifier.weight": math.sqrt(3.0) * (gain / math.sqrt(fan_in))}
    if linear.bias is not None:
        bounds["classifier.bias"] = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    return bounds


NEGATIVES = ("uniform", "doppel")


class ShardableSoftmax(PrototypeTerm):
    """A softmax cross-entropy over the logits of a class-weight matrix. The classes can be split across
    processes (``classifier.sharded``) and, per step, sampled (Partial FC, ``classifier.sample_rate``).
    Subclasses compute the logits of the columns they are given (:meth:`column_logits`)."""

    shardable = True

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.sample_rate = 1.0  # Partial FC: the share of (this process's) classes each step scores
        self.negatives = "uniform"
        self.table: DoppelgangerTable | None = None  # read for negatives="doppel"
        self.sample_excess: torch.Tensor | None = None  # on the device: the most positives a sample missed
        self.class_init_state: torch.Tensor | None = None  # deferred: the random stream its rows come from

    # -- class parameters drawn per shard (classifier.sharded): the whole matrix never exists ------------
    @abstractmethod
    def class_init_bounds(self) -> dict[str, float]:
        """Each class parameter's uniform initialisation bound, in the order the constructor draws them."""

    def defer_class_init_(self) -> None:
        """After a construction under :func:`deferred_class_init`: remember where the global random stream
        stood and move it past the draws the whole parameters would have taken, so everything built after
        draws what it would have."""
        self.class_init_state = torch.get_rng_state()
        for name, bound in self.class_init_bounds().items():
            _uniform_rows(tuple(getattr(*self._owner(name)).shape), bound, torch.default_generator, None)

    def shard_(self, shard: ClassShard) -> None:
        if self.class_init_state is None:
            super().shard_(shard)
        else:  # deferred: draw only this shard's rows
            self._draw_class_rows(shard.lo, shard.hi)
            self.shard = shard

    def materialize_(self) -> None:
        """All rows of deferred class parameters (one process, or weights loaded whole)."""
        if self.class_init_state is not None:
            self._draw_class_rows(0, self.num_classes)

    def _draw_class_rows(self, lo: int, hi: int) -> None:
        """Rows ``lo:hi`` of each class parameter, exactly as the whole initialisation would have drawn them."""
        generator = torch.Generator().set_state(self.class_init_state)
        for name, bound in self.class_init_bounds().items():
            meta = getattr(*self._owner(name))
            rows = _uniform_rows(tuple(meta.shape), bound, generator, (lo, hi))
            self._replace(name, nn.Parameter(rows, requires_grad=meta.requires_grad))
        self.class_init_state = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.materialize_()  # weights loaded before any shard is known (eval.py, init_from) load whole
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- Partial FC ----------------------------------------------------------------------------------
    def sample_(self, sample_rate: float, negatives: str, seed: int) -> None:
        """Partial FC (An et al., arcface_torch's rule): each step scores the positive classes of the global
        batch and fills up to ``sample_rate`` of the classes with negatives, drawn uniformly at random
        (``uniform``) or the batch classes' current doppelgangers first (``doppel``)."""
        self.sample_rate, self.negatives = float(sample_rate), negatives
        if self.sample_rate < 1:
            self.generator = torch.Generator().manual_seed(stable_seed("partial fc", seed))

    @abstractmethod
    def column_logits(self, embeddings: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C'] logits of this process's classes (``rows`` of them: a Partial FC sample; None: all), the
        margin (if any) at each row's ``targets`` column (-1: none here); ``scale`` stands for the term's
        scale parameter (None where it has none)."""

    def _scale(self) -> torch.Tensor | None:
        return getattr(self, "scale", None)

    def loss_and_logits(self, embeddings, labels):
        if not self.split() and self.sample_rate == 1:
            logits = self.column_logits(embeddings, labels, self._scale())
            return F.cross_entropy(logits, labels), ColumnLogits(logits, labels)
        scale = self._scale()
        if self.split():
            # Replicated inputs get their gradient x W: DDP averages it over the processes (see sharding).
            embeddings = sharding.gather_rows(sharding.times_world(embeddings))
            labels = sharding.gather_rows(labels)
            scale = None if scale is None else sharding.times_world(scale)
            targets, first = self.shard.targets(labels), self.shard.lo
        else:
            targets, first = labels, 0
        rows = None
        if self.sample_rate < 1:
            rows = self.sample_columns(labels, targets, first)
            column = torch.searchsorted(rows, targets.clamp_min(0)).clamp_max(len(rows) - 1)
            # -1: held elsewhere, or a positive that a too-small sample left out (check_sample stops the run)
            targets = torch.where((targets >= 0) & (rows[column] == targets), column, -1)
        logits = self.column_logits(embeddings, targets, scale, rows)
        if self.split():
            loss = sharding.sharded_cross_entropy(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets, ignore_index=-1)
        columns = torch.arange(self._classes_here(), device=labels.device) if rows is None else rows
        return loss, ColumnLogits(logits, labels, targets, columns + first)

    def _classes_here(self) -> int:
        """Rows of this process's class parameters (all classes unless sharded)."""
        return len(next(iter(self.class_tensors().values())))

    def _budget(self) -> int:
        """The columns a Partial FC step scores on this process (arcface_torch's int(rate x classes here))."""
        return max(1, int(self.sample_rate * self._classes_here()))

    def sample_columns(self, labels: torch.Tensor, targets: torch.Tensor, first: int) -> torch.Tensor:
        """The sorted columns (of this process's classes) scored this step: ``int(sample_rate x classes
        here)`` of them, every positive (a class of the global batch held here) first, then negatives.

        Fixed in size, so the step never waits for the device: where arcface_torch would widen the sample to
        more positives than that, a step here keeps only that many and :meth:`check_sample` (at the run's
        next sync point) stops the run with the sample rate that fits.
        """
        local, budget = self._classes_here(), self._budget()
        device = labels.device
        spare = torch.where(targets >= 0, targets, local)  # "not held here" goes to a spare slot
        positive = torch.zeros(local + 1, dtype=torch.bool, device=device).index_fill_(0, spare, True)[:local]
        # arcface_torch's draw: uniform priorities, the positives above them all, the top `budget` kept
        priority = to_device(torch.rand(local, generator=self.generator), device)
        if self.negatives == "doppel" and self.table is not None:
            mined = self.table.table[labels].flatten() - first  # on the device, as the labels
            mined = torch.where((mined >= 0) & (mined < local), mined, local)  # held here; EMPTY is < 0
            doppel = torch.zeros(local + 1, dtype=torch.bool, device=device).index_fill_(0, mined, True)[:local]
            priority = priority + 2.0 * doppel  # before any other negative, in random order among themselves
        priority = priority.masked_fill(positive, 4.0)
        excess = positive.sum() - budget
        self.sample_excess = excess if self.sample_excess is None else torch.maximum(self.sample_excess, excess)
        return priority.topk(budget).indices.sort().values

    def check_sample(self) -> None:
        """Stop a run whose Partial FC sample could not hold a step's positive classes (one sync)."""
        excess = 0 if self.sample_excess is None else int(self.sample_excess)
        if excess <= 0:
            return
        local, budget = self._classes_here(), self._budget()
        needed = budget + excess
        raise ValueError(f"classifier.sample_rate={self.sample_rate}: a step had {needed} classes of the batch among "
                         f"this process's {local} classes, more than its sample of {budget}: raise "
                         f"classifier.sample_rate to at least {needed / local:.3g}, or lower sampler.batch_size.")


class Softmax(ShardableSoftmax):
    """Softmax cross-entropy over a fully connected layer (the baseline of every table)."""

    class_parameters = ("classifier.weight", "classifier.bias")

    def __init__(self, embedding_dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(num_classes)
        self.classifier = nn.Linear(embedding_dim, num_classes, bias=bias, device=_class_device())

    def class_init_bounds(self):
        return _linear_bounds(self.classifier)

    def class_scores(self, embeddings):
        return self.classifier(embeddings)

    def class_vectors(self):
        return self.classifier.weight

    def column_logits(self, embeddings, targets, scale, rows=None):
        return F.linear(embeddings, *_rows(rows, self.classifier.weight, self.classifier.bias))


class L2Softmax(ShardableSoftmax):
    """L2-constrained softmax (Ranjan et al.): softmax cross-entropy on ``alpha * f / ||f||``.

    The Doppelganger paper (sec. 4.2.5) trains ``alpha`` from an initial value of 16. The classifier is
    an ordinary fully connected layer (weights not normalised, with bias), as in Ranjan et al.
    """

    class_parameters = ("classifier.weight", "classifier.bias")

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 16.0,
                 trainable_scale: bool = True, bias: bool = True) -> None:
        super().__init__(num_classes)
        self.classifier = nn.Linear(embedding_dim, num_classes, bias=bias, device=_class_device())
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=trainable_scale)

    def class_init_bounds(self):
        return _linear_bounds(self.classifier)

    def class_scores(self, embeddings):
        return self.column_logits(embeddings, None, self.scale)

    def class_vectors(self):
        return self.classifier.weight

    def column_logits(self, embeddings, targets, scale, rows=None):
        return F.linear(scale * F.normalize(embeddings, dim=1), *_rows(rows, self.classifier.weight,
                                                                        self.classifier.bias))

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale}


class TargetMarginSoftmax(ShardableSoftmax):
    """Softmax over ``magnitude_j * cos(theta_j)`` with the target logit replaced by ``magnitude_y * psi``.

    ``theta_j`` is the angle between ``f`` and the bias-free class weight ``W_j``. The magnitude is
    ``s`` (fixed or trainable ``scale``) or, with ``scale=None``, ``||f||``; times ``||W_j||`` when the
    weights are not normalised. NormFace, CosFace, ArcFace, SphereFace and L-Softmax differ only in
    ``psi`` and in these two choices.
    """

    class_parameters = ("weight",)

    def __init__(self, embedding_dim: int, num_classes: int, scale: float | None, trainable_scale: bool = False,
                 normalize_weights: bool = True) -> None:
        super().__init__(num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, device=_class_device()))
        nn.init.xavier_uniform_(self.weight)
        self.normalize_weights = normalize_weights
        if scale is None:
            self.scale = None
        else:
            self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=trainable_scale)

    def class_init_bounds(self):
        # nn.init.xavier_uniform_'s bound for a [C, D] matrix: fan_in D, fan_out C
        return {"weight": math.sqrt(3.0) * math.sqrt(2.0 / float(self.weight.shape[1] + self.weight.shape[0]))}

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        """psi(cos theta_y) for each example's target class."""
        raise NotImplementedError

    def _cosine_logits(self, embeddings: torch.Tensor, scale: torch.Tensor | None, weight: torch.Tensor,
                       weight_unit: torch.Tensor | None = None) -> torch.Tensor:
        # One B x C matmul gives magnitude_j * cos(theta_j) for every class: the row factor (s or ||f||)
        # scales f^ (B x D, cheaper than B x C); the column factor ||W_j|| stays in unnormalised W.
        rows = embeddings if scale is None else F.normalize(embeddings, dim=1) * scale  # ||f|| f^ = f
        if not self.normalize_weights:
            return rows @ weight.T
        return rows @ (F.normalize(weight, dim=1) if weight_unit is None else weight_unit).T

    def class_scores(self, embeddings):
        return self._cosine_logits(embeddings, self.scale, self.weight)

    def class_vectors(self):
        return self.weight

    def column_logits(self, embeddings, targets, scale, rows=None):
        (weight,) = _rows(rows, self.weight)
        unit = F.normalize(embeddings, dim=1)
        weight_unit = F.normalize(weight, dim=1)  # once: a [C, D] copy at 2M classes is 4 GB
        logits = self._cosine_logits(embeddings, scale, weight, weight_unit)
        held = targets >= 0
        columns = targets.clamp_min(0)  # rows whose target is elsewhere compute a value that is not used
        target_cos = (unit * weight_unit[columns]).sum(1)
        magnitude = embeddings.norm(dim=1) if scale is None else scale.expand_as(target_cos)
        if not self.normalize_weights:
            magnitude = magnitude * weight.norm(dim=1)[columns]
        value = magnitude * self.target_logit(target_cos)
        batch = torch.arange(len(targets), device=targets.device)
        if not self.split():  # every row's target is here (kept apart: the unsharded result stays bit-exact)
            index, value = (batch, targets), value
        else:
            index, value = (batch[held], targets[held]), value[held]
        # In place: the matmul's backward needs its inputs, not its output. The miner never reads the
        # target column, so the logits it reads may carry the margin there.
        return logits.index_put_(index, value)

    def scalars(self) -> dict[str, torch.Tensor]:
        trainable = self.scale is not None and self.scale.requires_grad
        return {"scale": self.scale} if trainable else {}


class NormFace(TargetMarginSoftmax):
    """NormFace (Wang et al. 2017): softmax on ``s * cos(theta_j)``, weights and features normalised."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 16.0, trainable_scale: bool = True) -> None:
        super().__init__(embedding_dim, num_classes, scale, trainable_scale)

    def target_logit(self, cosine):
        return cosine


class CosFace(TargetMarginSoftmax):
    """CosFace / large margin cosine loss, eq. (19) of the SEC paper: target ``s * (cos theta - m)``."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__(embedding_dim, num_classes, scale)
        self.margin = margin

    def target_logit(self, cosine):
        return cosine - self.margin


class ArcFace(TargetMarginSoftmax):
    """ArcFace (Deng et al.): target ``s * cos(theta + m)``, with the gradient of that exact function.

    Beyond ``theta > pi - m``, ``cos(theta + m)`` would rise again with theta (a wrong-way gradient);
    there the target is ``cos(theta) - m * sin(m)`` instead, the rule of the ArcFace authors' code.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.45) -> None:
        super().__init__(embedding_dim, num_classes, scale)
        self.margin = margin

    def target_logit(self, cosine):
        # cos(t + m) = cos t cos m - sin t sin m; sin t >= 0 on [0, pi]. The clamp keeps the
        # gradient of the root finite at |cos| = 1, where the true one is unbounded.
        sine = (1 - cosine.pow(2)).clamp_min(1e-12).sqrt()
        shifted = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        return torch.where(cosine >= math.cos(math.pi - self.margin), shifted,
                           cosine - self.margin * math.sin(self.margin))


class MultiplicativeAngularMargin(TargetMarginSoftmax):
    """Eq. (2)-(3) of the IE paper: target ``magnitude * psi(theta)``, ``psi = (-1)^k cos(m theta) - 2k``
    on ``[k pi / m, (k+1) pi / m]`` with integer ``m``.

    ``cos(m theta)`` is the Chebyshev polynomial ``T_m(cos theta)``, so the gradient is exact without an
    arccos. Annealing (the training trick of L-Softmax and SphereFace) uses
    ``(lambda * cos theta + psi) / (1 + lambda)`` with ``lambda = max(lambda_min, lambda_base *
    (1 + gamma * step) ** -power)``, stepped once per training call.
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin: int, scale: float | None,
                 normalize_weights: bool, anneal: bool = True, lambda_base: float = 1000.0, lambda_min: float = 5.0,
                 gamma: float = 0.12, power: float = 1.0) -> None:
        super().__init__(embedding_dim, num_classes, scale, normalize_weights=normalize_weights)
        if int(margin) != margin or margin < 1:
            raise ValueError(f"margin must be a positive integer for {type(self).__name__}, got {margin}.")
        self.margin = int(margin)
        self.anneal = anneal
        self.lambda_base, self.lambda_min, self.gamma, self.power = lambda_base, lambda_min, gamma, power
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_lambda = self.annealing_lambda

    @property
    def annealing_lambda(self) -> float:
        if not self.anneal:
            return 0.0
        return max(self.lambda_min, self.lambda_base * (1 + self.gamma * int(self.step)) ** -self.power)

    def target_logit(self, cosine):
        cosine = cosine.clamp(-1, 1)
        with torch.no_grad():
            k = torch.floor(torch.arccos(cosine) * self.margin / math.pi).clamp_max(self.margin - 1)
        psi = (1 - 2 * (k % 2)) * chebyshev(self.margin, cosine) - 2 * k
        self.last_lambda = self.annealing_lambda
        return (self.last_lambda * cosine + psi) / (1 + self.last_lambda)

    def loss_and_logits(self, embeddings, labels):
        result = super().loss_and_logits(embeddings, labels)
        if self.training:
            self.step += 1
        return result

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"lambda": torch.tensor(self.last_lambda)} if self.anneal else {}


class SphereFace(MultiplicativeAngularMargin):
    """SphereFace / A-Softmax (Liu et al. 2017): normalised weights, multiplicative margin ``m``.

    The SEC paper uses ``s = 64, m = 3`` (features normalised and scaled by ``s``); ``scale=null`` gives
    the original form, scaled by ``||f||``.
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin: int = 3, scale: float | None = 64.0,
                 **annealing) -> None:
        super().__init__(embedding_dim, num_classes, margin, scale, normalize_weights=True, **annealing)


class LargeMarginSoftmax(MultiplicativeAngularMargin):
    """L-Softmax (Liu et al. 2016), eq. (2)-(3) of the IE paper: logits ``||W_j|| ||f|| cos theta_j``."""

    def __init__(self, embedding_dim: int, num_classes: int, margin: int = 4, **annealing) -> None:
        super().__init__(embedding_dim, num_classes, margin, None, normalize_weights=False, **annealing)


def _rows(rows: torch.Tensor | None, *params: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The given rows of per-class parameters (all of them for None). Indexing the parameter keeps the
    gradient dense: rows not sampled get zero, and the optimizer's momentum and weight decay still move
    them, as in arcface_torch's Partial FC."""
    return params if rows is None else tuple(None if p is None else p[rows] for p in params)


def chebyshev(m: int, x: torch.Tensor) -> torch.Tensor:
    """T_m(x) = cos(m * arccos(x)) by the recurrence T_{n+1} = 2x T_n - T_{n-1}."""
    previous, current = torch.ones_like(x), x
    if m == 0:
        return previous
    for _ in range(m - 1):
        previous, current = current, 2 * x * current - previous
    return current


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[B, C] matrix of ||x_i - c_j||^2 (clamped at 0 against round-off)."""
    return (x.pow(2).sum(1, keepdim=True) + centres.pow(2).sum(1) - 2 * x @ centres.T).clamp_min(0)


class CenterLoss(PrototypeTerm):
    """Center loss (Wen et al.), eq. (4) of the IE paper: ``1/(2M) sum ||f_i - mu_{y_i}||^2``.

    Centres are parameters learned by the optimiser (Wen et al. use a separate update rate instead).
    Use jointly with ``Softmax`` (``loss=center``). Mining logits are ``-||f - mu_c||^2``.
    """

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__(num_classes)
        self.centres = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)

    def class_scores(self, embeddings):
        return -squared_distances(embeddings, self.centres)  # the nearest centre

    def class_vectors(self):
        return self.centres

    def loss_and_logits(self, embeddings, labels):
        distances = squared_distances(embeddings, self.centres)
        own = (embeddings - self.centres[labels]).pow(2).sum(1)
        return own.mean() / 2, ColumnLogits(-distances, labels)


class IELoss(PrototypeTerm):
    """Include and Exclude loss, eq. (5)-(6) of the IE paper.

    ``mean_n [ d_{n,y}/(2 s2) + alpha + log sum_{c in Q_n} exp(-d_{n,c}/(2 s2)) ]_+`` with
    ``d_{n,c} = ||f_n - mu_c||^2``, learned centres ``mu`` and ``Q_n`` the ``ceil(q_fraction * K)``
    nearest centres among the ``K`` other classes present in the batch (sec. 4: all of them for CIFAR,
    20% for faces). ``variance`` picks ``s2``:
    ``batch`` - eq. (5)'s estimate ``sum_n d_{n,y} / (M - 1)``, detached (the paper treats s2 as an
    independent variable); ``learned`` - a parameter (Algorithm 1), kept positive as ``exp(log s2)``;
    ``fixed`` - ``initial_variance`` (with Q = 1 and 0.5 it is eq. (7)).
    Gradients are autograd's exact ones of eq. (6), not the estimates of eq. (8)-(10).
    """

    VARIANCES = ("batch", "learned", "fixed")

    def __init__(self, embedding_dim: int, num_classes: int, alpha: float = 0.1, q_fraction: float = 1.0,
                 variance: str = "batch", initial_variance: float = 1.0) -> None:
        super().__init__(num_classes)
        if variance not in self.VARIANCES:
            raise ValueError(f"IELoss variance must be one of {self.VARIANCES}, got {variance!r}.")
        if not 0 < q_fraction <= 1:
            raise ValueError(f"IELoss q_fraction must be in (0, 1], got {q_fraction}.")
        self.alpha, self.q_fraction, self.variance = alpha, q_fraction, variance
        self.centres = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.log_variance = nn.Parameter(torch.tensor(math.log(initial_variance)),
                                         requires_grad=variance == "learned")
        self.last_variance = torch.tensor(initial_variance)

    def class_scores(self, embeddings):
        return -squared_distances(embeddings, self.centres)  # the nearest centre

    def class_vectors(self):
        return self.centres

    def loss_and_logits(self, embeddings, labels):
        distances = squared_distances(embeddings, self.centres)
        own = (embeddings - self.centres[labels]).pow(2).sum(1)
        if self.variance == "batch":
            variance = (own.detach().sum() / max(len(labels) - 1, 1)).clamp_min(1e-12)
        else:
            variance = self.log_variance.exp()
        self.last_variance = variance.detach()
        present = torch.unique(labels)
        others = len(present) - 1
        if others == 0:  # one class in the batch: nothing to exclude
            return own.sum() * 0.0 + self.log_variance * 0.0, ColumnLogits(-distances, labels)
        q = max(1, math.ceil(self.q_fraction * others))
        to_present = distances[:, present].masked_fill(labels[:, None] == present[None, :], float("inf"))
        nearest = to_present.topk(q, dim=1, largest=False).values
        exclude = torch.logsumexp(-nearest / (2 * variance), dim=1)
        loss = F.relu(own / (2 * variance) + self.alpha + exclude).mean()
        return loss, ColumnLogits(-distances / (2 * variance.detach()), labels)

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"variance": self.last_variance}
