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
from horovod_leader.compression import Codec
from horovod_leader.optim.node_average import Part, fill_weighted, node_mean
from horovod_leader.packing import FlatBuffer, key_name


def post_weighted_sum(comm: Collectives, flats: Dict, out: Dict, weights: Optional[torch.Tensor],
                      contribute: bool, name: str) -> List:
    """Post ``out[key] = sum_i w_i * x_i`` over workers for every packed buffer; return handles.

    ``weights`` holds one weight, or one per tensor in packing order (None: weight 1).
    ``out`` must not be read until the handles are done. The sums are taken in
    ``flat.accumulation_dtype`` (float32 for half-precision models, whose weighted values
    would overflow), so ``out`` holds float32 for them.
    """
    handles = []
    offset = 0
    for key, flat in flats.items():
        buf = out.get(key)
        if buf is None:
            buf = out[key] = flat.accumulator()
        fill_weighted(flat, buf, weights, contribute, offset)
        offset += len(flat.tensors)
        handles.append(comm.allreduce_async_(buf, name=f"{name}.{key_name(key)}"))
    return handles


class CompressedGather:
    """Every worker's compressed difference ``x_i - r`` from a shared reference r, all-gathered
    (``horovod_leader.compression``); ``combine`` then forms ``sum_i w_i (r + d_i)`` locally in
    float32, in rank order, so every rank holds the same result bitwise."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self._counts: List[int] = []

    def post(self, comm: Collectives, flats: Dict, refs: Dict, contribute: bool, name: str) -> List:
        handles, self._counts = [], []
        for key, flat in flats.items():
            ref = refs.get(key)
            with torch.no_grad():
                payload = (self.codec.encode_diff(flat.flat, ref) if contribute  # one pass
                           else self.codec.encode(torch.zeros_like(flat.flat)))
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
                buf = out[key] = flat.accumulator()
            total = torch.zeros(flat.numel, dtype=torch.float32, device=flat.flat.device)
            ref = refs.get(key)
            reference = ref.float() if ref is not None else None
            columns = len(flat.tensors)
            for worker in range(gathered[0].shape[0]):
                w = weights[worker]
                w = w[column:column + columns] if w.numel() > 1 else w.expand(columns)
                if not bool((w != 0).any()):
                    continue
                payload = [g[worker] for g in gathered]
                for o, n, weight in zip(flat.offsets, flat.numels, w.tolist()):  # one pass per tensor
                    self.codec.decode_into(payload, total[o:o + n], None if reference is None else reference[o:o + n],
                                           alpha=weight, accumulate=True, start=o)
            buf.copy_(total)
            column += columns


class CopyFromRoot:
    """Rank ``root``'s values of some packed buffers, for every rank: how the averaging
    methods treat buffers that are not floating point (bool masks, integer counters), which
    are never averaged. The values travel through a buffer of their own and are copied in by
    ``finish``, so a worker that keeps stepping meanwhile (asynchronous rounds) is not written
    to in the middle of a step."""

    def __init__(self, root: int = 0):
        self.root = root
        self.incoming: Dict = {}

    def post(self, comm: Collectives, flats: Dict, name: str) -> List:
        handles = []
        for key, flat in flats.items():
            buf = self.incoming.get(key)
            if buf is None:
                buf = self.incoming[key] = flat.like()
            if comm.rank == self.root:
                buf.copy_(flat.flat)
            handles.append(comm.broadcast_async_(buf, self.root, name=f"{name}.{key_name(key)}"))
        return handles

    def finish(self, flats: Dict) -> None:
        for key, flat in flats.items():
            flat.flat.copy_(self.incoming[key])


class MeanRound:
    """The mean over the healthy workers of the parameters and floating buffers (LocalSGD,
    EASGD, DiLoCo): one all-reduce of a count of healthy workers and one of the sums, posted
    together. With ``compression``, the parameters travel as compressed differences from
    ``refs`` (a reference every rank holds alike) in an all-gather, with the health flags.
    Buffers that are not floating point (``others``) are copied from rank 0 (``CopyFromRoot``)."""

    def __init__(self, codec: Optional[Codec] = None):
        self.count = torch.zeros(1, dtype=torch.float64)
        self.params: Dict = {}
        self.buffers: Dict = {}
        self.others = CopyFromRoot(0)
        self._gather = CompressedGather(codec) if codec else None
        self._flats: Dict = {}
        self._refs: Dict = {}

    def post(self, comm: Collectives, params: Dict, buffers: Dict, healthy: bool, refs: Optional[Dict] = None,
             others: Optional[Dict] = None) -> List:
        self.count.fill_(1.0 if healthy else 0.0)
        if self._gather is None:
            handles = [comm.allreduce_async_(self.count, name="healthy")]
            handles += post_weighted_sum(comm, params, self.params, None, healthy, "sum")
        else:
            self._flats, self._refs = params, dict(refs or {})
            handles = [comm.allgather_async(self.count.reshape(1, 1), name="healthy")]
            handles += self._gather.post(comm, params, self._refs, healthy, "sum")
        handles += post_weighted_sum(comm, buffers, self.buffers, None, healthy, "buffers")
        handles += self.others.post(comm, others or {}, "others")
        return handles

    def run(self, comm: Collectives, nodes, params: Dict, buffers: Dict, healthy: bool,
            refs: Optional[Dict] = None, others: Optional[Dict] = None):
        """The whole round, a generator for ``yield from``: the flat exchange (``post`` then
        ``finish``), or, over a wrapper's ``nodes`` (``Topology.node_sets``), the node-aware
        one (``horovod_leader.optim.node_average``: one payload per node across the links,
        compressed on that hop only). Returns how many workers were healthy."""
        if nodes is None:
            results = yield self.post(comm, params, buffers, healthy, refs=refs, others=others)
            return self.finish(results)
        codec = self._gather.codec if self._gather is not None else None
        extra = self.others.post(comm, others or {}, "others")
        parts = [Part(params, self.params, None, codec, dict(refs or {})), Part(buffers, self.buffers)]
        _, count = yield from node_mean(comm, nodes, parts, healthy, "mean", extra=extra)
        return count

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
    """``x <- x - pull (x - centre)``; pull 1 copies, so "replace by the centre" is exact. A
    centre kept in float32 for a half-precision model is pulled toward in float32 and the
    result rounded once."""
    from horovod_leader import fused

    with torch.no_grad():
        if pull == 1.0:
            flat.flat.copy_(centre)
        elif pull != 0.0 and centre.dtype != flat.flat.dtype:
            x = flat.flat.to(centre.dtype)
            flat.flat.copy_(x.sub_(x - centre, alpha=pull))
        elif pull != 0.0:
            fused.leader_pull_(flat.flat, None, centre, global_pull=pull)


def replace_all_(flats: Dict, centres: Dict) -> None:
    for key, flat in flats.items():
        pull_toward_(flat, centres[key], 1.0)
