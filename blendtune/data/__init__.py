"""Datasets: an adapter per on-disk layout (registry name -> DatasetAdapter) returning train and test
datasets, plus the held-out split."""
from blendtune.data.base import DATASETS, DataCheck, DatasetAdapter, MultimodalDataset, Problem, Splits, build_splits, data_root
from blendtune.data import synthetic, avdigits, crema_d, av_csv, features  # noqa: F401  (registers the adapters)

__all__ = ["MultimodalDataset", "Splits", "build_splits", "data_root", "DATASETS", "DataCheck", "DatasetAdapter",
           "Problem"]
