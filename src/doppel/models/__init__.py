from doppel.models.factory import BACKBONES, EmbeddingNet, get_backbone

__all__ = ["BACKBONES", "EmbeddingNet", "get_backbone"]
