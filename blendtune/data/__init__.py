"""Datasets: an adapter per on-disk layout (registry name -> DatasetAdapter, with its options dataclass)
returning train and test datasets, plus the held-out split; the user's own datasets wrapped alike."""
from blendtune.data.base import (DATASETS, DataCheck, DatasetAdapter, MultimodalDataset, Problem, Splits, build_splits,
                                 data_root, make_splits)
from blendtune.data.user import ItemDataset, as_dataset
from blendtune.data import synthetic, avdigits, avmnist, crema_d, av_csv, features  # noqa: F401  (registers the adapters)

__all__ = ["MultimodalDataset", "ItemDataset", "Splits", "as_dataset", "build_splits", "make_splits", "data_root",
           "DATASETS", "DataCheck", "DatasetAdapter", "Problem"]
