"""Datasets: name -> builder returning train and test `MultimodalDataset`s, plus the held-out split."""
from blendtune.data.base import MultimodalDataset, Splits, build_splits, data_root, DATASETS
from blendtune.data import synthetic, avdigits  # noqa: F401  (registers the datasets)

__all__ = ["MultimodalDataset", "Splits", "build_splits", "data_root", "DATASETS"]
