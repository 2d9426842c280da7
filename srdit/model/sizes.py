"""Backbone sizes: name -> (depth, hidden width, heads). The table is plain data owned by the config layer
(`srdit.config.SIZES`, which validates `model.size` without importing the model); it is re-exported here."""

from srdit.config import SIZES

__all__ = ["SIZES"]
