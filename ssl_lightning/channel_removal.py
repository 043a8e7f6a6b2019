"""Former home of PaddedFoldConv2d and SparseChannelLRN, now in :mod:`ssl_lightning.compaction`; kept so that
models pickled whole by earlier releases (``torch.save(model)``) still load."""

from ssl_lightning.compaction import PaddedFoldConv2d, SparseChannelLRN

__all__ = ["PaddedFoldConv2d", "SparseChannelLRN"]
