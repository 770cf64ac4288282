"""The round shared by GRAWA, EASGD and local SGD: an all-reduce of weighted parameters.

Each worker contributes ``weight * x`` (per tensor, for LGRAWA), or zeros when it is not
healthy (non-finite parameters, buffers or gradient norms), so a diverged worker never poisons
the centre, the norms or the batch-norm statistics. The all-reduces are posted
non-blocking; the refresh generators of the wrappers yield their handles (see
``horovod_leader.async_schedule``), so the same code serves the synchronous and the
asynchronous modes.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from horovod_leader.comm import Collectives
from horovod_leader.flat import FlatBuffer, key_name


def post_weighted_sum(comm: Collectives, flats: Dict, out: Dict, weights: Optional[torch.Tensor],
                      contribute: bool, name: str) -> List:
    """Post ``out[key] = sum_i w_i * x_i`` over workers for every packed buffer; return handles.

    ``weights`` holds one weight, or one per tensor in packing order (None: weight 1).
    ``out`` must not be read until the handles are done.
    """
    handles = []
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
        handles.append(comm.allreduce_async_(buf, name=f"{name}.{key_name(key)}"))
    return handles


class MeanRound:
    """The mean over the healthy workers of the parameters and floating buffers (LocalSGD,
    EASGD): one all-reduce of a count of healthy workers and one of the sums, posted together."""

    def __init__(self):
        self.count = torch.zeros(1, dtype=torch.float64)
        self.params: Dict = {}
        self.buffers: Dict = {}

    def post(self, comm: Collectives, params: Dict, buffers: Dict, healthy: bool) -> List:
        self.count.fill_(1.0 if healthy else 0.0)
        handles = [comm.allreduce_async_(self.count, name="healthy")]
        handles += post_weighted_sum(comm, params, self.params, None, healthy, "sum")
        handles += post_weighted_sum(comm, buffers, self.buffers, None, healthy, "buffers")
        return handles

    def finish(self) -> int:
        """Once the posted all-reduces are done: turn the sums into means, in place.

        Returns how many workers were healthy; with none, the sums are left as they are
        (there is no mean, and the caller raises ``AllWorkersDiverged``).
        """
        healthy = int(round(float(self.count)))
        if healthy:
            for buf in list(self.params.values()) + list(self.buffers.values()):
                buf.div_(healthy)
        return healthy


def pull_toward_(flat: FlatBuffer, centre: torch.Tensor, pull: float) -> None:
    """``x <- x - pull (x - centre)``; pull 1 copies, so "replace by the centre" is exact."""
    from horovod_leader import fused

    with torch.no_grad():
        if pull == 1.0:
            flat.flat.copy_(centre)
        elif pull != 0.0:
            fused.leader_pull_(flat.flat, None, centre, global_pull=pull)


def replace_all_(flats: Dict, centres: Dict) -> None:
    for key, flat in flats.items():
        pull_toward_(flat, centres[key], 1.0)
