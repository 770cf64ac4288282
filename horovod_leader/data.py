"""Data sets, split into a disjoint shard per rank.

``digits`` (the default) is scikit-learn's bundled 8x8 handwritten digits: real data that
needs no download. Images are scaled to [0, 1] and standardised with the training mean/std.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset


def digits(test_fraction: float = 0.2, seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """(train, test) TensorDatasets of 1x8x8 float images and int64 labels, split reproducibly."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    to_set = lambda idx: TensorDataset(torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx]))
    return to_set(train_idx), to_set(test_idx)


def shard(dataset: TensorDataset, rank: int, size: int) -> TensorDataset:
    """This rank's disjoint, strided shard (rank, rank+size, ...) of ``dataset``."""
    return TensorDataset(*(t[rank::size] for t in dataset.tensors))
