"""Checkpoints of a training run: one file per rank, written atomically, loaded as data.

Layout: ``OUT/checkpoints/rank{r}.pt`` for every rank, then ``OUT/checkpoints/latest.json``
naming the step, written by rank 0 after every rank has finished its file. Each file is
written to a temporary name and renamed, so a kill during a write leaves the previous
checkpoint intact. Files are loaded with ``torch.load(weights_only=True)``: a checkpoint is
tensors and plain containers, and a crafted file cannot run code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch


def folder(out) -> Path:
    return Path(out) / "checkpoints"


def latest_step(out) -> Optional[int]:
    """The step of the last complete checkpoint in ``out``, or None."""
    marker = folder(out) / "latest.json"
    try:
        return int(json.loads(marker.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(trainer, seconds: float) -> None:
    """Every rank writes its own state; rank 0 then points latest.json at this step."""
    hvd = trainer.hvd
    path = folder(trainer.out)
    if trainer.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    hvd.allreduce(torch.zeros(1), name="checkpoint.mkdir")  # the folder exists before anyone writes
    state = {
        "step": trainer.step,
        "elapsed": seconds,
        "model": trainer.model.state_dict(),
        "wrapper": trainer.opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "losses": trainer.losses[-100:],
    }
    atomic_save(state, path / f"rank{trainer.rank}.pt")
    hvd.allreduce(torch.zeros(1), name="checkpoint.written")  # every rank's file is complete
    if trainer.rank == 0:
        marker = path / "latest.json"
        tmp = marker.with_name(".latest.json.tmp")
        tmp.write_text(json.dumps({"step": trainer.step, "world_size": trainer.size, "elapsed": seconds}))
        os.replace(tmp, marker)


def load(trainer) -> None:
    """Restore a trainer from ``trainer.out``'s last checkpoint (same world size)."""
    marker = json.loads((folder(trainer.out) / "latest.json").read_text())
    if marker["world_size"] != trainer.size:
        raise ValueError(f"--resume: the checkpoint was written by {marker['world_size']} ranks, "
                         f"this job has {trainer.size}")
    state = torch.load(folder(trainer.out) / f"rank{trainer.rank}.pt", weights_only=True)
    if state["step"] != marker["step"]:
        raise ValueError(f"--resume: rank {trainer.rank}'s checkpoint is at step {state['step']}, "
                         f"latest.json says {marker['step']}")
    trainer.model.load_state_dict(state["model"])
    trainer.opt.load_state_dict(state["wrapper"])
    torch.set_rng_state(state["torch_rng"])
    trainer.step = state["step"]
    trainer.elapsed_before = state["elapsed"]
    trainer.losses = list(state["losses"])
