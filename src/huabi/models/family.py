"""The model-family enums, kept importable from their old place; they live in :mod:`huabi.core.family`
so that ``core`` can name a family without reaching up into ``models``."""

from huabi.core.family import ModelFamily, Prediction, UNetVariant

__all__ = ["ModelFamily", "Prediction", "UNetVariant"]
