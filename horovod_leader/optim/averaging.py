"""The round shared by GRAWA, EASGD and local SGD: an all-reduce of weighted parameters.

Each worker contributes ``weight * x`` (per tensor, for LGRAWA), or nothing at all when its
parameters are not finite, so a diverged worker never poisons the centre.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from horovod_leader.comm import Collectives
from horovod_leader.flat import FlatBuffer, key_name


def weighted_sum_(comm: Collectives, flats: Dict, out: Dict, weights: Optional[torch.Tensor], contribute: bool,
                  name: str) -> Dict:
    """``out[key] = sum_i w_i * x_i`` over workers, for every packed buffer; returns ``out``.

    ``weights`` holds one weight, or one per tensor in packing order (None: weight 1).
    """
    offset = 0
    for key, flat in flats.items():
        buf = out.get(key)
        if buf is None:
            buf = out[key] = flat.like()
        count = len(flat.tensors)
        with torch.no_grad():
            if not contribute:
                buf.zero_()
            elif weights is None:
                buf.copy_(flat.flat)
            elif weights.numel() == 1:
                torch.mul(flat.flat, float(weights), out=buf)
            else:
                for src, dst, w in zip(flat.views(flat.flat), flat.views(buf), weights[offset:offset + count].tolist()):
                    torch.mul(src, w, out=dst)
        offset += count
        comm.allreduce_(buf, name=f"{name}.{key_name(key)}")
    return out


def pull_toward_(flat: FlatBuffer, centre: torch.Tensor, pull: float) -> None:
    """``x <- x - pull (x - centre)``; pull 1 copies, so "replace by the centre" is exact."""
    from horovod_leader import fused

    with torch.no_grad():
        if pull == 1.0:
            flat.flat.copy_(centre)
        elif pull != 0.0:
            fused.leader_pull_(flat.flat, None, centre, global_pull=pull)


def healthy_count(comm: Collectives, healthy: bool) -> float:
    """How many workers have finite parameters (one all-reduce of one number)."""
    count = torch.tensor([1.0 if healthy else 0.0], dtype=torch.float64)
    comm.allreduce_(count, name="healthy")
    return float(count)


def mean_of_healthy_(comm: Collectives, flats: Dict, out: Dict, healthy: bool, count: float, name: str) -> Dict:
    """``out[key]`` = the mean over the ``count`` workers with finite parameters."""
    return weighted_sum_(comm, flats, out, torch.tensor([1.0 / max(count, 1.0)]), healthy, name)


def replace_by_mean_(comm: Collectives, flats: Dict, out: Dict, healthy: bool, count: float, name: str) -> None:
    """Every worker takes the mean of the healthy workers (used for floating buffers too)."""
    mean_of_healthy_(comm, flats, out, healthy, count, name)
    for key, flat in flats.items():
        pull_toward_(flat, out[key], 1.0)
