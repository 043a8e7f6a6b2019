"""Former home of CompactConv2d, now in :mod:`ssl_lightning.compaction`; kept so that models pickled whole by
earlier releases (``torch.save(model)``) still load."""

from ssl_lightning.compaction import CompactConv2d

__all__ = ["CompactConv2d"]
