"""Loss terms (one file per family) and :class:`LossSet`, their weighted sum from config."""

from doppel.losses.exemplar import CosineMarginLoss, LiftedStructured
from doppel.losses.loss_set import LossSet
from doppel.losses.prototype import L2Softmax, PrototypeTerm

__all__ = ["CosineMarginLoss", "L2Softmax", "LiftedStructured", "LossSet", "PrototypeTerm"]
