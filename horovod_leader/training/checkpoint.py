"""Checkpoints of a training run: one file per rank, written atomically, loaded as data.

Layout: ``OUT/checkpoints/step{S}/rank{r}.pt`` for every rank, then
``OUT/checkpoints/latest.json`` naming step S, written by rank 0 once every rank's file is
complete; only then are older step folders removed. S is the largest step count of any rank:
in synchronous runs every rank is at the same step; in asynchronous ones (which checkpoint at
the end, after ``close()``) ranks may have taken different numbers of steps, and each file
holds its own rank's count. Each file is written to a temporary name and renamed. So a kill
at any moment (during a rank's write, or between two ranks' writes) leaves ``latest.json``
pointing at a complete checkpoint: at most the steps since it are lost.

Files are read with ``torch.load(weights_only=True)``: a checkpoint is tensors and plain
containers, and a crafted file that carries a pickled payload is refused, not run.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch


def folder(out) -> Path:
    return Path(out) / "checkpoints"


def latest_step(out) -> Optional[int]:
    """The step of the last complete checkpoint in ``out``, or None."""
    try:
        return int(json.loads((folder(out) / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_folder(out, step: int) -> Path:
    return folder(out) / f"step{step:09d}"


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: Path) -> dict:
    """Load one checkpoint file as data only (``weights_only=True``)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"refusing to load {path}: it holds more than tensors and plain containers "
                         f"(a pickled object that could run code): {str(error).splitlines()[0]}") from None


def save(out, rank: int, size: int, step: int, state: dict, hvd) -> None:
    """Every rank writes its own ``state`` (``Trainer.state_dict()``); rank 0 then points
    latest.json at this checkpoint. Collective: every rank calls it at the same point."""
    # One folder name for every rank, even when their step counts differ (asynchronous runs).
    label = int(hvd.allgather(torch.tensor([step], dtype=torch.int64), name="checkpoint.label").max())
    target = step_folder(out, label)
    if rank == 0:
        target.mkdir(parents=True, exist_ok=True)
    hvd.allreduce(torch.zeros(1), name="checkpoint.mkdir")  # the folder exists before anyone writes
    atomic_save(state, target / f"rank{rank}.pt")
    hvd.allreduce(torch.zeros(1), name="checkpoint.written")  # every rank's file is complete
    if rank == 0:
        marker = folder(out) / "latest.json"
        tmp = marker.with_name(".latest.json.tmp")
        tmp.write_text(json.dumps({"step": label, "world_size": size, **state.get("clock", {})}))
        os.replace(tmp, marker)
        for old in folder(out).glob("step*"):
            if old != target and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def load(out, rank: int, size: int) -> dict:
    """This rank's state from ``out``'s last complete checkpoint (written by as many ranks)."""
    marker = json.loads((folder(out) / "latest.json").read_text())
    if marker["world_size"] != size:
        raise ValueError(f"--resume: the checkpoint was written by {marker['world_size']} ranks, this job has {size}")
    return read(step_folder(out, marker["step"]) / f"rank{rank}.pt")
