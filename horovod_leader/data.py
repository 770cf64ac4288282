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
    """This rank's disjoint, strided shard (rank, rank+size, ...) of ``dataset``.

    Every shard has the same length (the remainder is dropped), so every rank has the same
    number of batches per epoch: synchronous methods need equal step counts.
    """
    length = len(dataset) // size
    return TensorDataset(*(t[rank::size][:length] for t in dataset.tensors))


DATASETS = ("digits", "cifar10", "synthetic")


def cifar10(data_dir: str, download: bool = False) -> Tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 through torchvision's loader (``data_dir`` holds ``cifar-10-batches-py``),
    normalised with the usual per-channel mean and std, as tensors. Augmentation is left out:
    the comparison between methods is what matters here, and every method sees the same data."""
    import os

    from torchvision.datasets import CIFAR10

    if not download and not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        raise ValueError(f"data_dir={data_dir!r} has no cifar-10-batches-py folder; pass --download to fetch it")

    def to_set(train: bool) -> TensorDataset:
        raw = CIFAR10(root=data_dir, train=train, download=download)
        images = torch.from_numpy(np.asarray(raw.data, dtype=np.float32) / 255.0).permute(0, 3, 1, 2)
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
        return TensorDataset((images - mean) / std, torch.tensor(raw.targets, dtype=torch.int64))

    return to_set(True), to_set(False)


def synthetic(n_train: int = 4096, n_test: int = 1024, image_size: int = 32, channels: int = 3,
              num_classes: int = 10, seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """Random images labelled by a fixed random linear teacher: learnable, needs no files."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, channels, image_size, image_size, generator=gen)
    teacher = torch.randn(channels * image_size * image_size, num_classes, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def load(name: str, data_dir: str = "data", download: bool = False, seed: int = 0):
    """(train, test, in_channels, num_classes) for a data set name."""
    if name == "digits":
        train, test = digits(seed=seed)
    elif name == "cifar10":
        train, test = cifar10(data_dir, download)
    elif name == "synthetic":
        train, test = synthetic(seed=seed)
    else:
        raise ValueError(f"dataset={name!r} is not one of {list(DATASETS)}")
    return train, test, train.tensors[0].shape[1], 10
