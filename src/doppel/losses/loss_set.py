"""A weighted sum of named loss terms, built from the ``loss`` config group."""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from doppel.losses.prototype import NEGATIVES, PrototypeTerm, deferred_class_init
from doppel.sampling.doppelganger import DoppelgangerTable, Mining, TableUpdate

CLASSIFIER_KEYS = ("sharded", "sample_rate", "negatives")


class Losses(NamedTuple):
    total: torch.Tensor
    logs: dict[str, torch.Tensor]  # per-term values and trainable scalars, detached
    proposals: TableUpdate | None  # the prototype term's doppelganger proposals (when mining)


class FiniteWatch:
    """Remembers, on the device and without making the host wait, the first step whose loss terms were not
    all finite and their values then; :meth:`check` (one sync) raises about it."""

    def __init__(self, names: list[str]) -> None:
        self.names = [*names, "total"]
        self.step: torch.Tensor | None = None  # -1 while every step was finite
        self.values: torch.Tensor | None = None

    def record(self, values: torch.Tensor, step: int) -> None:
        if self.step is None:
            self.step = torch.full((), -1, dtype=torch.long, device=values.device)
            self.values = torch.zeros_like(values)
        first = (self.step < 0) & ~torch.isfinite(values).all()
        self.step = torch.where(first, step, self.step)
        self.values = torch.where(first, values, self.values)

    def check(self) -> None:
        step = -1 if self.step is None else int(self.step)
        if step < 0:
            return
        values = self.values.tolist()
        bad = next(i for i, value in enumerate(values) if not math.isfinite(value))
        raise FloatingPointError(
            f"loss term {self.names[bad]!r} is {values[bad]} at step {step}: lower optim.lr or check the "
            f"data for empty or corrupt images."
        )


class LossSet(nn.Module):
    """``terms`` maps a name to a term config with ``_target_`` and ``weight``; ``regularizer`` (the
    ``regularizer`` config group) adds more terms of the same form, e.g. SEC on top of any loss.

    Runtime sizes (``embedding_dim``, ``num_classes``) are passed to the terms that take them. A weight
    is finite and non-negative unless the term's class sets ``allows_negative_weight``. ``classifier``
    (the ``classifier`` section) sets how the prototype term holds its classes (``sharded``) and which it
    scores each step (Partial FC: ``sample_rate``, ``negatives``; its draws seeded by ``seed``).
    Calling the set returns :class:`Losses`: the total loss, a dict of per-term values and trainable
    scalars, named ``loss/<term>`` and ``<term>/<scalar>``, and, given ``mining``, the prototype term's
    doppelganger proposals.
    """

    def __init__(self, terms: DictConfig | dict, embedding_dim: int, num_classes: int,
                 regularizer: DictConfig | dict | None = None, classifier: DictConfig | dict | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if not terms:
            raise ValueError("loss.terms is empty: pick a loss, e.g. loss=l2s_mb.")
        regularizer = regularizer or {}
        if clash := set(terms) & set(regularizer):
            raise ValueError(f"regularizer term names {sorted(clash)} are also loss terms: rename one of them.")
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        runtime = {"embedding_dim": embedding_dim, "num_classes": num_classes}
        named = [(f"loss.terms.{name}", name, spec) for name, spec in terms.items()]
        named += [(f"regularizer.{name}", name, spec) for name, spec in regularizer.items()]
        # classifier.sharded: the (first) classifier term draws its class rows once each process knows its share
        defer = (classifier or {}).get("sharded") is True
        for key, name, spec in named:
            spec = dict(spec)
            weight = spec.pop("weight", 1.0)
            term_class = get_class(spec["_target_"])
            if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                    or (weight < 0 and not getattr(term_class, "allows_negative_weight", False))):
                raise ValueError(f"{key}.weight={weight} must be a finite number >= 0: a negative weight "
                                 "maximises the term (0 turns it off).")
            accepted = inspect.signature(term_class).parameters
            deferring = defer and issubclass(term_class, PrototypeTerm) and term_class.shardable
            try:
                with deferred_class_init(deferring):
                    self.terms[name] = instantiate(spec, **{k: v for k, v in runtime.items() if k in accepted})
            except Exception as error:  # the term's own check: name the config key it came from
                cause = error.__cause__ or error  # hydra wraps it
                raise ValueError(f"{key}: {cause}") from None
            if deferring:
                self.terms[name].defer_class_init_()
            defer = defer and not issubclass(term_class, PrototypeTerm)  # only the first classifier is split
            self.weights[name] = float(weight)
        self.finite = FiniteWatch(list(self.terms))
        self._configure_classifier(dict(classifier or {}), seed)

    def _configure_classifier(self, classifier: dict, seed: int) -> None:
        if unknown := sorted(set(classifier) - set(CLASSIFIER_KEYS)):
            raise ValueError(f"classifier.{unknown[0]} is not a setting; the classifier section takes "
                             f"{', '.join(CLASSIFIER_KEYS)}.")
        sharded = classifier.get("sharded", False)
        if not isinstance(sharded, bool):
            raise ValueError(f"classifier.sharded={sharded} must be true or false.")
        sample_rate = classifier.get("sample_rate", 1.0)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
            raise ValueError(f"classifier.sample_rate={sample_rate} must be a number in (0, 1]: the share of the "
                             "classes each step scores (1: all of them).")
        negatives = classifier.get("negatives", "uniform")
        if negatives not in NEGATIVES:
            raise ValueError(f"classifier.negatives={negatives!r} is not one of {NEGATIVES}.")
        term = self.prototype_term
        for key, value, asked in (("sharded", "true", sharded), ("sample_rate", sample_rate, sample_rate < 1)):
            if asked and (term is None or not term.shardable):
                what = "has no classifier term" if term is None else f"term {type(term).__name__} cannot be split"
                raise ValueError(f"classifier.{key}={value}: the loss {what}; it applies to the class-weight matrix "
                                 "of a softmax term (softmax, l2s, normface, cosface, arcface, sphereface, lsoftmax).")
        if term is not None:
            term.sharded = sharded
        if term is not None and term.shardable:
            term.sample_(sample_rate, negatives, seed)

    def read_table(self, table: DoppelgangerTable) -> None:
        """The prototype term draws the batch classes' doppelgangers as its Partial FC negatives
        (``classifier.negatives=doppel``) from the mined table."""
        self.prototype_term.table = table

    @property
    def prototype_term(self) -> PrototypeTerm | None:
        """The first classifier term: its logits feed the doppelganger miner."""
        return next((t for t in self.terms.values() if isinstance(t, PrototypeTerm)), None)

    def check_labels(self, labels: torch.Tensor) -> None:
        """Labels outside the classifier are an error; the module checks each batch's on the host, before
        it moves to the device, so the step itself never reads them back."""
        if self.prototype_term is not None:
            self.prototype_term.check_labels(labels)

    def check(self) -> None:
        """Raise about a loss that was not finite, or a Partial FC sample too small, at any step so far:
        the one device sync the checks cost, made at the run's sync points (and before every save)."""
        self.finite.check()
        if self.prototype_term is not None:
            self.prototype_term.check_sample()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, mining: Mining | None = None,
                step: int = 0) -> Losses:
        """The losses of one step (``step``: its number, for :meth:`check`'s message). Labels are not
        checked here (:meth:`check_labels`), nor finiteness (:meth:`check`): either would wait for the device."""
        total = embeddings.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        proposals = None
        miner = self.prototype_term if mining is not None else None
        for name, term in self.terms.items():
            if isinstance(term, PrototypeTerm):
                value, found = term.loss_and_proposals(embeddings, labels, mining if term is miner else None)
                proposals = found if term is miner else proposals
            else:
                value = term(embeddings, labels)
            total = total + self.weights[name] * value
            logs[f"loss/{name}"] = value.detach()
            for scalar_name, scalar in getattr(term, "scalars", dict)().items():
                logs[f"{name}/{scalar_name}"] = scalar.detach()
        logs["loss/total"] = total.detach()
        self.finite.record(torch.stack([logs[f"loss/{name}"].float() for name in self.terms] + [logs["loss/total"]]),
                           step)
        return Losses(total, logs, proposals)
