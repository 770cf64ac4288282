"""Data sets as tensors: ``load(name)`` gives (train, test, in_channels, num_classes).

``digits`` (the default) is scikit-learn's bundled 8x8 handwritten digits: real data that
needs no download. Images are scaled to [0, 1] and standardised with the training mean/std.
``cifar10`` is read through torchvision and normalised as in the authors' code; its
augmentation (random crops and flips of whole batches) is applied while training, by
``horovod_leader.training.augment``. ``mnist1d`` (``horovod_leader.training.data_mnist1d``) is
generated locally and cached; ``pystdlib`` (``horovod_leader.training.data_pystdlib``) is the
Python standard library's own source, as bytes, for a language model. Which samples each rank sees is decided per epoch by
``horovod_leader.training.pipeline``; ``shard`` is the fixed split used by the examples.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


DATASETS = ("digits", "cifar10", "synthetic", "mnist1d", "pystdlib")

# The shape of one input of each data set, (channels, height, width) for images and
# (channels, length) for signals, known without loading it, so that the training command
# can check a model and augmentation against it before any collective.
IMAGE_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "synthetic": (3, 32, 32), "mnist1d": (1, 40),
                "pystdlib": (128,)}  # pystdlib: a window of bytes (``data_pystdlib.CONTEXT``)

# The authors' normalisation (kuangliu/pytorch-cifar's values, used by the LSGD code).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def black_level(name: str) -> torch.Tensor:
    """Per-channel value of a black pixel after normalisation: what padding fills with, as
    torchvision's ``RandomCrop(padding=4)`` pads the raw image with zeros before normalising."""
    if name == "cifar10":
        return -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    return torch.zeros(IMAGE_SHAPES.get(name, (1,))[0])


def cifar10(data_dir: str, download: bool = False) -> Tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 through torchvision's loader (``data_dir`` holds ``cifar-10-batches-py``), as
    float tensors of shape (N, 3, 32, 32) normalised with the authors' per-channel mean and
    std. Augmentation is applied per batch while training, not here."""
    import os

    from torchvision.datasets import CIFAR10

    if not download and not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        raise ValueError(f"data_dir={data_dir!r} has no cifar-10-batches-py folder; pass --download to fetch it")

    def to_set(train: bool) -> TensorDataset:
        raw = CIFAR10(root=data_dir, train=train, download=download)
        images = torch.from_numpy(np.asarray(raw.data, dtype=np.float32) / 255.0).permute(0, 3, 1, 2)
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
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


def load(name: str, data_dir: str = "data", download: bool = False, seed: int = 0, samples: Optional[int] = None):
    """(train, test, in_channels, num_classes) for a data set name. ``samples``: MNIST-1D's
    sample count (train and test together; default 50,000). Its data seed is fixed, not
    ``seed``, so that every run sees the same signals."""
    if name == "pystdlib":  # byte-level language modelling: 256 "classes", the next byte
        from horovod_leader.training.data_pystdlib import pystdlib
        train, test = pystdlib()
        return train, test, 1, 256
    if name == "mnist1d":
        from horovod_leader.training.data_mnist1d import DEFAULT_SAMPLES, mnist1d
        train, test = mnist1d(DEFAULT_SAMPLES if samples is None else samples)
    elif name == "digits":
        train, test = digits(seed=seed)
    elif name == "cifar10":
        train, test = cifar10(data_dir, download)
    elif name == "synthetic":
        train, test = synthetic(seed=seed)
    else:
        raise ValueError(f"dataset={name!r} is not one of {list(DATASETS)}")
    return train, test, train.tensors[0].shape[1], 10
