"""Loss terms (one file per family), regularisers, and :class:`LossSet`, their weighted sum from config."""

from doppel.losses.exemplar import (
    ContrastiveLoss,
    CosineMarginLoss,
    LiftedStructured,
    MultiSimilarityLoss,
    NormalizedNPairLoss,
    NTXentLoss,
    SemiHardTripletLoss,
    TripletLoss,
)
from doppel.losses.loss_set import LossSet
from doppel.losses.prototype import (
    ArcFace,
    CenterLoss,
    CosFace,
    IELoss,
    L2Softmax,
    LargeMarginSoftmax,
    NormFace,
    PrototypeTerm,
    Softmax,
    SphereFace,
)
from doppel.losses.regularizers import L2Reg, SphericalEmbeddingConstraint

__all__ = [
    "ArcFace", "CenterLoss", "ContrastiveLoss", "CosFace", "CosineMarginLoss", "IELoss", "L2Reg", "L2Softmax",
    "LargeMarginSoftmax", "LiftedStructured", "LossSet", "MultiSimilarityLoss", "NTXentLoss", "NormFace",
    "NormalizedNPairLoss", "PrototypeTerm", "SemiHardTripletLoss", "Softmax", "SphereFace",
    "SphericalEmbeddingConstraint", "TripletLoss",
]
