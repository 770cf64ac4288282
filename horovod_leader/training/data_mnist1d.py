"""MNIST-1D (Greydanus, "Scaling down deep learning"): 40-point 1-D signals, 10 classes,
generated on this machine by the ``mnist1d`` package, no download.

The signals come from the package's procedural ``mnist1d.data.make_dataset`` (never
``get_dataset``, which downloads) with its default generation arguments, except the sample
count. Its published baselines, on 4,000 training samples: about 94% for a CNN, about 68% for
an MLP. Here the default is 50,000 samples (40,000 for training), so that no method saturates
within a minute on 4 ranks.

* The data seed is fixed (42, the package's), not the run's ``--seed``: every method and seed
  sees the same data.
* ``make_dataset`` reseeds Python's ``random`` and NumPy's global generator; the caller's
  states of both are restored afterwards.
* Generating 50,000 samples takes about 12 s, so the arrays are cached in the user's cache
  folder (``$HOROVOD_LEADER_CACHE``, else ``$XDG_CACHE_HOME/horovod_leader``, else
  ``~/.cache/horovod_leader``), keyed by a digest of the generation arguments, and written to
  a temporary name then renamed: ranks that start together never read a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATA_SEED = 42
DEFAULT_SAMPLES = 50_000
SIGNAL_LENGTH = 40


def cache_folder() -> Path:
    if os.environ.get("HOROVOD_LEADER_CACHE"):
        return Path(os.environ["HOROVOD_LEADER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "horovod_leader"


def generation_args(num_samples: int, seed: int = DATA_SEED) -> Dict:
    """The package's default generation arguments with our sample count and seed."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # where get_dataset would download from: not a generation argument
    args.update(num_samples=int(num_samples), seed=int(seed))
    return args


def generate(args: Dict) -> Dict[str, np.ndarray]:
    """Run ``make_dataset``, leaving the caller's ``random`` and NumPy states as they were."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        made = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {key: np.asarray(made[key]) for key in ("x", "y", "x_test", "y_test")}


def cached_arrays(args: Dict, folder: Optional[Path] = None) -> Dict[str, np.ndarray]:
    """The generated arrays, from the cache when they are there."""
    folder = Path(folder) if folder is not None else cache_folder()
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"mnist1d-{digest}.npz"
    if path.exists():
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    arrays = generate(args)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def mnist1d(num_samples: int = DEFAULT_SAMPLES, folder: Optional[Path] = None) -> Tuple[TensorDataset, TensorDataset]:
    """(train, test): float32 signals of shape (N, 1, 40) and int64 labels (80% / 20% split)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 100:
        raise ValueError(f"num_samples must be an integer >= 100, got {num_samples!r}")
    arrays = cached_arrays(generation_args(num_samples), folder)

    def to_set(x, y) -> TensorDataset:
        signals = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)
        return TensorDataset(signals, torch.from_numpy(np.asarray(y, dtype=np.int64)))

    return to_set(arrays["x"], arrays["y"]), to_set(arrays["x_test"], arrays["y_test"])
