"""A weighted sum of named loss terms, built from the ``loss`` config group."""

from __future__ import annotations

import inspect

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from doppel.losses.prototype import PrototypeTerm


class LossSet(nn.Module):
    """``terms`` maps a name to a term config with ``_target_`` and ``weight``; ``regularizer`` (the
    ``regularizer`` config group) adds more terms of the same form, e.g. SEC on top of any loss.

    Runtime sizes (``embedding_dim``, ``num_classes``) are passed to the terms that take them.
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
        for name, spec in [*terms.items(), *regularizer.items()]:
            spec = dict(spec)
            weight = float(spec.pop("weight", 1.0))
            accepted = inspect.signature(get_class(spec["_target_"])).parameters
            self.terms[name] = instantiate(spec, **{k: v for k, v in runtime.items() if k in accepted})
            self.weights[name] = weight

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
