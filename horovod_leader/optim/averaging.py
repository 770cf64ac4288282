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

from horovod_leader import compression
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


class CompressedGather:
    """Every worker's compressed difference ``x_i - r`` from a shared reference r, all-gathered
    (``horovod_leader.compression``); ``combine`` then forms ``sum_i w_i (r + d_i)`` locally in
    float32, in rank order, so every rank holds the same result bitwise."""

    def __init__(self, kind: str):
        self.kind = kind
        self._counts: List[int] = []

    def post(self, comm: Collectives, flats: Dict, refs: Dict, contribute: bool, name: str) -> List:
        handles, self._counts = [], []
        for key, flat in flats.items():
            ref = refs.get(key)
            with torch.no_grad():
                diff = (flat.flat - ref if ref is not None else flat.flat) if contribute else torch.zeros_like(flat.flat)
            payload = compression.encode(self.kind, diff)
            self._counts.append(len(payload))
            for j, part in enumerate(payload):
                handles.append(comm.allgather_async(part.reshape(1, -1), name=f"{name}.{key_name(key)}.{j}"))
        return handles

    def combine(self, results: List, flats: Dict, refs: Dict, weights: torch.Tensor, out: Dict) -> None:
        """``out[key] = sum_i weights[i] * (r + d_i)``; ``weights`` is (workers,) or
        (workers, tensors) with one column per parameter tensor in packing order."""
        position, column = 0, 0
        for (key, flat), parts in zip(flats.items(), self._counts):
            gathered = results[position:position + parts]
            position += parts
            buf = out.get(key)
            if buf is None:
                buf = out[key] = flat.like()
            total = torch.zeros(flat.numel, dtype=torch.float32, device=flat.flat.device)
            ref = refs.get(key)
            columns = len(flat.tensors)
            for worker in range(gathered[0].shape[0]):
                w = weights[worker]
                w = w[column:column + columns] if w.numel() > 1 else w.expand(columns)
                if not bool((w != 0).any()):
                    continue
                diff = compression.decode(self.kind, [g[worker] for g in gathered], flat.numel).to(total.device)
                if ref is not None:
                    diff = diff + ref.float()
                for o, n, weight in zip(flat.offsets, flat.numels, w.tolist()):
                    total[o:o + n].add_(diff[o:o + n], alpha=weight)
            buf.copy_(total)
            column += columns


class MeanRound:
    """The mean over the healthy workers of the parameters and floating buffers (LocalSGD,
    EASGD, DiLoCo): one all-reduce of a count of healthy workers and one of the sums, posted
    together. With ``compression``, the parameters travel as compressed differences from
    ``refs`` (a reference every rank holds alike) in an all-gather, with the health flags."""

    def __init__(self, compression_kind: Optional[str] = None):
        self.count = torch.zeros(1, dtype=torch.float64)
        self.params: Dict = {}
        self.buffers: Dict = {}
        self._gather = CompressedGather(compression_kind) if compression_kind else None
        self._flats: Dict = {}
        self._refs: Dict = {}

    def post(self, comm: Collectives, params: Dict, buffers: Dict, healthy: bool, refs: Optional[Dict] = None) -> List:
        self.count.fill_(1.0 if healthy else 0.0)
        if self._gather is None:
            handles = [comm.allreduce_async_(self.count, name="healthy")]
            handles += post_weighted_sum(comm, params, self.params, None, healthy, "sum")
        else:
            self._flats, self._refs = params, dict(refs or {})
            handles = [comm.allgather_async(self.count.reshape(1, 1), name="healthy")]
            handles += self._gather.post(comm, params, self._refs, healthy, "sum")
        handles += post_weighted_sum(comm, buffers, self.buffers, None, healthy, "buffers")
        return handles

    def finish(self, results: Optional[List] = None) -> int:
        """Once the posted collectives are done (``results``: what the round's ``yield``
        returned): turn the sums into means, in place.

        Returns how many workers were healthy; with none, the sums are left as they are
        (there is no mean, and the caller raises ``AllWorkersDiverged``).
        """
        if self._gather is not None:  # the parameters come as gathered payloads, the buffers as sums
            flags = results[0].reshape(-1)
            healthy = int(round(float(flags.sum())))
            if healthy:
                self._gather.combine(results[1:], self._flats, self._refs, flags / healthy, self.params)
            sums = list(self.buffers.values())
        else:
            healthy = int(round(float(self.count)))
            sums = list(self.params.values()) + list(self.buffers.values())
        if healthy:
            for buf in sums:
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
