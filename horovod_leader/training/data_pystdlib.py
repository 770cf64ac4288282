"""``--dataset pystdlib``: bytes of the Python standard library's own source files, for a
byte-level language model. The corpus is on every machine already: no download.

* Files: every ``.py`` file under the interpreter's standard library folder
  (``sysconfig.get_paths()["stdlib"]``), sorted by path; excluded: ``site-packages``, test
  folders, and ``encodings`` (about a hundred generated charmap tables, near copies of one
  another, which would leak between training and validation). Every ``VALIDATION_EVERY``-th file (by that order) is held out for validation;
  the rest is the training text. Files are joined with a newline.
* Samples: the text cut into windows of ``CONTEXT + 1`` bytes (training: non-overlapping;
  validation: ``VALIDATION_WINDOWS`` windows spread evenly over the whole validation text), as
  (input, target) pairs shifted by one byte: int64 tensors of shape (N, ``CONTEXT``) with values in [0, 256).
* Cached like MNIST-1D (``data_mnist1d.cache_folder``), keyed by the interpreter's version
  and the corpus' file count and size, with the interpreter version, file counts and byte counts in a
  metadata JSON beside the arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

CONTEXT = 128  # bytes a sample predicts from
VALIDATION_EVERY = 20  # one file in 20 is held out
VALIDATION_WINDOWS = 2048
EXCLUDED = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "encodings")


def source_files(root: Optional[str] = None) -> List[Path]:
    """The standard library's ``.py`` files, sorted by their path below ``root``."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not any(part in EXCLUDED for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def corpus(root: Optional[str] = None) -> Tuple[bytes, bytes, Dict]:
    """(training text, validation text, metadata)."""
    files = source_files(root)
    train, valid = [], []
    for index, path in enumerate(files):
        (valid if index % VALIDATION_EVERY == 0 else train).append(path.read_bytes())
    meta = {"python": sys.version.split()[0], "files": len(files), "validation_files": len(valid),
            "train_bytes": sum(map(len, train)), "validation_bytes": sum(map(len, valid)),
            "context": CONTEXT, "validation_every": VALIDATION_EVERY}
    return b"\n".join(train), b"\n".join(valid), meta


def windows(text: bytes, count: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``CONTEXT + 1`` bytes as (inputs, targets): all of them, or
    ``count`` of them spread evenly over the text (a representative sample of every file)."""
    data = np.frombuffer(text, dtype=np.uint8)
    n = (len(data) - 1) // CONTEXT
    starts = np.arange(n) * CONTEXT
    if count is not None and count < n:
        starts = starts[np.linspace(0, n - 1, count).round().astype(np.int64)]
    index = starts[:, None] + np.arange(CONTEXT + 1)[None, :]
    block = torch.from_numpy(data[index].astype(np.int64))
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


def pystdlib(folder: Optional[Path] = None) -> Tuple[TensorDataset, TensorDataset]:
    """(train, validation) datasets, from the cache when it is there."""
    from horovod_leader.training.data_mnist1d import cache_folder

    folder = Path(folder) if folder is not None else cache_folder()
    path = folder / f"pystdlib-{_cache_key()}.npz"
    if path.exists():
        arrays = np.load(path)
        train = (torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
        valid = (torch.from_numpy(arrays["valid_x"]), torch.from_numpy(arrays["valid_y"]))
    else:
        train_text, valid_text, meta = corpus()
        train, valid = windows(train_text), windows(valid_text, VALIDATION_WINDOWS)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(temporary, train_x=train[0].numpy().astype(np.uint8), train_y=train[1].numpy().astype(np.uint8),
                 valid_x=valid[0].numpy().astype(np.uint8), valid_y=valid[1].numpy().astype(np.uint8))
        os.replace(temporary, path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    as_long = lambda pair: TensorDataset(pair[0].long(), pair[1].long())
    return as_long(train), as_long(valid)


def metadata(folder: Optional[Path] = None) -> Optional[Dict]:
    """The cached corpus' metadata (interpreter version, files, bytes), if it was built."""
    from horovod_leader.training.data_mnist1d import cache_folder

    path = (Path(folder) if folder else cache_folder()) / f"pystdlib-{_cache_key()}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cache_key() -> str:
    """The corpus' cache key: the interpreter, its files' count and total size, the settings."""
    files = source_files()
    size = sum(p.stat().st_size for p in files)
    return hashlib.sha256(json.dumps([sys.version, len(files), size, CONTEXT, VALIDATION_EVERY, VALIDATION_WINDOWS,
                                      EXCLUDED]).encode()).hexdigest()[:12]
