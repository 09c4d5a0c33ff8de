from qformer.models.qformer import QFormer, QFormerCache, QFormerOutput

__all__ = ["QFormer", "QFormerCache", "QFormerOutput"]
