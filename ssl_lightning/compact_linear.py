"""Former home of CompactLinear, now in :mod:`ssl_lightning.compaction`; kept so that models pickled whole by
earlier releases (``torch.save(model)``) still load."""

from ssl_lightning.compaction import CompactLinear

__all__ = ["CompactLinear"]
