from qformer.models.qformer import QFormerCache, QFormerModel, QFormerOutput

__all__ = ["QFormerModel", "QFormerCache", "QFormerOutput"]
