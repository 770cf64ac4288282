"""A tiny CIFAR-10 in the real on-disk format (pickled batches), for tests that cannot download.

torchvision checks each file's MD5 against the published archive; ``allow_fixture`` lifts
exactly that check for the duration of a test, so everything else (reading the pickles,
reshaping, the labels) runs through torchvision's real CIFAR10 loader.
"""
import contextlib
import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, per_batch: int = 40, test: int = 40, seed: int = 0) -> Path:
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)

    def batch(n, name):
        labels = rng.randint(0, 10, size=n)
        # Learnable: each class brightens its own tenth of the image.
        data = rng.randint(0, 128, size=(n, 3072)).astype(np.uint8)
        for i, label in enumerate(labels):
            data[i, label * 300:(label + 1) * 300] += 100
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)

    for k in range(1, 6):
        batch(per_batch, f"data_batch_{k}")
    batch(test, "test_batch")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f)
    return folder


@contextlib.contextmanager
def allow_fixture():
    from torchvision.datasets import CIFAR10

    saved = (CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta)
    CIFAR10.train_list = [[name, None] for name, _ in saved[0]]
    CIFAR10.test_list = [[name, None] for name, _ in saved[1]]
    CIFAR10.meta = {**saved[2], "md5": None}
    try:
        yield
    finally:
        CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta = saved
