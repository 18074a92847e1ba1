"""A sampler written outside Doppel: it declares what it needs and is chosen from the command line."""

import torch

from doppel.sampling.samplers import IdentityBatchSampler, SamplerContext


class PairsFromTheTable(IdentityBatchSampler):
    """Every class in pairs of 2 examples; half the classes are the table's doppelgangers of the others."""

    uses_table = True

    def __init__(self, context: SamplerContext, batch_size: int, **settings) -> None:
        super().__init__(context, batch_size, examples_per_class=2, **settings)
        self.table = context.table

    def _choose_classes(self, n_classes: int, generator: torch.Generator) -> list[int]:
        chosen = self._random_classes(n_classes - n_classes // 2, set(), generator)
        partners = [(self.table.doppelgangers(c) or [c])[0] for c in chosen]  # itself while the table is empty
        return (chosen + partners)[:n_classes]
