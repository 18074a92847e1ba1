"""A weighted sum of named loss terms, built from the ``loss`` config group."""

from __future__ import annotations

import inspect
import math

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from doppel.losses.prototype import PrototypeTerm


class LossSet(nn.Module):
    """``terms`` maps a name to a term config with ``_target_`` and ``weight``; ``regularizer`` (the
    ``regularizer`` config group) adds more terms of the same form, e.g. SEC on top of any loss.

    Runtime sizes (``embedding_dim``, ``num_classes``) are passed to the terms that take them. A weight
    is finite and non-negative unless the term's class sets ``allows_negative_weight``.
    Calling the set returns the total loss and a dict of per-term values and trainable scalars,
    named ``loss/<term>`` and ``<term>/<scalar>``.
    """

    def __init__(self, terms: DictConfig | dict, embedding_dim: int, num_classes: int,
                 regularizer: DictConfig | dict | None = None) -> None:
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
        for key, name, spec in named:
            spec = dict(spec)
            weight = spec.pop("weight", 1.0)
            term_class = get_class(spec["_target_"])
            if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                    or (weight < 0 and not getattr(term_class, "allows_negative_weight", False))):
                raise ValueError(f"{key}.weight={weight} must be a finite number >= 0: a negative weight "
                                 "maximises the term (0 turns it off).")
            accepted = inspect.signature(term_class).parameters
            try:
                self.terms[name] = instantiate(spec, **{k: v for k, v in runtime.items() if k in accepted})
            except Exception as error:  # the term's own check: name the config key it came from
                cause = error.__cause__ or error  # hydra wraps it
                raise ValueError(f"{key}: {cause}") from None
            self.weights[name] = float(weight)

    @property
    def prototype_term(self) -> PrototypeTerm | None:
        """The first classifier term: its logits feed the doppelganger miner."""
        return next((t for t in self.terms.values() if isinstance(t, PrototypeTerm)), None)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = embeddings.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            value = term(embeddings, labels)
            total = total + self.weights[name] * value
            logs[f"loss/{name}"] = value.detach()
            for scalar_name, scalar in getattr(term, "scalars", dict)().items():
                logs[f"{name}/{scalar_name}"] = scalar.detach()
        logs["loss/total"] = total.detach()
        if not torch.isfinite(total):  # one device sync per step; name the culprit only on failure
            bad = next((name for name in self.terms if not torch.isfinite(logs[f"loss/{name}"])), "total")
            raise FloatingPointError(
                f"loss term {bad!r} is {logs[f'loss/{bad}'].item()}: lower optim.lr or check the data for "
                f"empty or corrupt images."
            )
        return total, logs
