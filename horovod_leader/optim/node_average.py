r"""Node-aware averages: one payload per node across the links.

A flat all-reduce over every rank sends each node's payload across the links once per
rank, in whatever order the ring or tree of the MPI library takes; a compressed average
all-gathers every rank's payload. Here an average goes in three phases, each a set of
non-blocking collectives that a round generator yields (``horovod_leader.async_schedule``):

1. **inside each node**, in float32 over shared memory (the group's mpi4py communicator on the
   CPU, outside Horovod's single queue; its Horovod process set otherwise): the sum of the
   node's weighted parameters :math:`S_n = \sum_{i \in n} w_i x_i` and of its weights
   :math:`W_n = \sum_{i \in n} w_i` (per tensor for LGRAWA), with the count of healthy workers;
2. **across the links**, among the nodes' first ranks only (``Topology.leaders_set``): the
   sums, in one all-reduce; or, with compression, each node's weighted mean's difference from
   the shared reference, :math:`d_n = S_n / W_n - r`, compressed, in one all-gather with the
   node's weights, so that the links carry one compressed payload per node;
3. **inside each node**, from its first rank: the centre
   :math:`c = \sum_n S_n / \sum_n W_n`, or :math:`c = \sum_n W_n (r + \hat d_n) / \sum_n W_n`
   (decoded and summed in float32 in node order), with the totals (a broadcast).

Every rank ends with the same bytes (each node's first rank computes c from the same data in
the same order, and broadcasts it). The result equals the flat average up to the order of the
float32 summation. With one node, or one rank per node, the flat exchanges are used
(``Topology.node_sets`` is None).

``comm_bytes`` counts phase 1 only, each rank's own contribution, as a flat all-reduce counts
it once per rank; the relays' phases 2 and 3 forward what was already counted. What crosses
the links (compressed, when asked) is what the interface counters measure
(``benchmarks/cluster.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from horovod_leader.async_schedule import Together
from horovod_leader.compression import Codec
from horovod_leader.packing import FlatBuffer, key_name


@dataclass
class Part:
    """One set of packed buffers to average.

    Args:
        flats: the packed buffers (parameters, or floating buffers).
        out: receives the weighted mean of every buffer, in ``accumulation_dtype``.
        weights: this worker's weight, one per tensor in packing order or one for all (float64);
            None: weight 1.
        codec: compress the hop across the links (None: float32).
        refs: the reference every rank holds alike, for ``codec`` (missing keys: zeros).
    """

    flats: Dict[Any, FlatBuffer]
    out: Dict[Any, torch.Tensor]
    weights: Optional[torch.Tensor] = None
    codec: Optional[Codec] = None
    refs: Optional[Dict[Any, torch.Tensor]] = None

    @property
    def tensors(self) -> int:
        return sum(len(flat.tensors) for flat in self.flats.values())


def fill_weighted(flat: FlatBuffer, buf: torch.Tensor, weights: Optional[torch.Tensor], contribute: bool,
                  offset: int = 0) -> None:
    """``buf = w * x`` for one packed buffer (per tensor when ``weights`` has one per tensor,
    from ``offset``); zeros when this worker does not contribute."""
    with torch.no_grad():
        if not contribute:
            buf.zero_()
        elif weights is None:
            buf.copy_(flat.flat)
        elif weights.numel() == 1:
            buf.copy_(flat.flat).mul_(float(weights))
        else:
            count = len(flat.tensors)
            for src, dst, w in zip(flat.views(flat.flat), flat.views(buf), weights[offset:offset + count].tolist()):
                dst.copy_(src).mul_(w)


def _weight_vector(part: Part, contribute: bool) -> torch.Tensor:
    """This worker's weight for every tensor of ``part`` (float64), zeros when it does not contribute."""
    n = part.tensors
    if not contribute:
        return torch.zeros(n, dtype=torch.float64)
    if part.weights is None:
        return torch.ones(n, dtype=torch.float64)
    w = part.weights.detach().double().reshape(-1).cpu()
    return w.expand(n).clone() if w.numel() == 1 else w.clone()


def _per_element(flat: FlatBuffer, per_tensor: torch.Tensor, device) -> torch.Tensor:
    """A per-tensor vector spread over the buffer's elements (float32)."""
    counts = torch.tensor(flat.numels, device=device)
    return torch.repeat_interleave(per_tensor.to(device=device, dtype=torch.float32), counts)


def node_mean(comm, nodes, parts: List[Part], contribute: bool, name: str, extra: Optional[List] = None):
    """The three phases (a generator for ``yield from``) over ``nodes`` (a wrapper's
    ``topology.NodeSets``); returns the totals: per part the summed weights of each tensor
    (float64), and the count of contributing workers.

    ``extra``: handles posted before the first phase, waited for with the last (their results
    are dropped)."""
    device = next((flat.device for part in parts for flat in part.flats.values()), torch.device("cpu"))
    in_node, leader, is_leader = nodes.in_node, nodes.relay, nodes.is_relay
    vectors = [_weight_vector(part, contribute) for part in parts]
    totals = torch.cat(vectors + [torch.tensor([1.0 if contribute else 0.0], dtype=torch.float64)])
    # 1. inside the node: the node's sums and weights (``extra`` is waited for with phase 3)
    handles = []
    for i, part in enumerate(parts):
        offset = 0
        for key, flat in part.flats.items():
            buf = part.out.get(key)
            if buf is None:
                buf = part.out[key] = flat.accumulator()
            fill_weighted(flat, buf, part.weights, contribute, offset)
            offset += len(flat.tensors)
            handles.append(comm.allreduce_async_(buf, name=f"{name}.node.{i}.{key_name(key)}", process_set=in_node))
    handles.append(comm.allreduce_async_(totals, name=f"{name}.node.totals", process_set=in_node))
    yield Together(handles)
    # 2. across the links, among the nodes' first ranks
    gathered: List = []
    if is_leader:
        handles = [comm.allgather_async(totals.reshape(1, -1), name=f"{name}.cross.totals",
                                        process_set=nodes.leaders, counted=False)]
        for i, part in enumerate(parts):
            for key, flat in part.flats.items():
                buf = part.out[key]
                if part.codec is None:
                    handles.append(comm.allreduce_async_(buf, name=f"{name}.cross.{i}.{key_name(key)}",
                                                         process_set=nodes.leaders, counted=False))
                    continue
                ref = (part.refs or {}).get(key)
                mean = _divide(flat, buf, _node_weights(totals, vectors, i, part, key), device)
                payload = part.codec.encode_diff(mean, ref.to(mean.dtype) if ref is not None else None)
                handles += [comm.allgather_async(piece.reshape(1, -1), name=f"{name}.cross.{i}.{key_name(key)}.{j}",
                                                 process_set=nodes.leaders, counted=False)
                            for j, piece in enumerate(payload)]
                gathered.append((i, key, len(payload)))
        results = yield handles
        per_node = results[0]  # nodes x totals
        totals.copy_(per_node.sum(0))
        position = 1
        for i, part in enumerate(parts):
            offset = sum(len(v) for v in vectors[:i])
            for key, flat in part.flats.items():
                weights_of_tensors = totals[offset:offset + len(flat.tensors)]
                if part.codec is None:
                    position += 1
                    _divide(flat, part.out[key], weights_of_tensors, device, out=part.out[key])
                else:
                    count = next(n for j, k, n in gathered if j == i and k == key)
                    pieces = results[position:position + count]
                    position += count
                    _combine(part, key, flat, pieces, per_node[:, offset:offset + len(flat.tensors)],
                             weights_of_tensors, device)
                offset += len(flat.tensors)
    else:
        yield []
    # 3. inside the node: the centre and the totals, from the node's first rank
    handles = [comm.broadcast_async_(part.out[key], leader, name=f"{name}.spread.{i}.{key_name(key)}",
                                     process_set=in_node, counted=False)
               for i, part in enumerate(parts) for key in part.flats]
    handles.append(comm.broadcast_async_(totals, leader, name=f"{name}.spread.totals", process_set=in_node,
                                         counted=False))
    yield handles + list(extra or [])
    sizes = [len(v) for v in vectors]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [totals[bounds[i]:bounds[i + 1]] for i in range(len(parts))], int(round(float(totals[-1])))


def _node_weights(totals: torch.Tensor, vectors: List[torch.Tensor], i: int, part: Part, key) -> torch.Tensor:
    """The node's summed weights for the tensors of ``part``'s buffer ``key``."""
    offset = sum(len(v) for v in vectors[:i])
    for k, flat in part.flats.items():
        if k == key:
            return totals[offset:offset + len(flat.tensors)]
        offset += len(flat.tensors)
    raise KeyError(key)


def _divide(flat: FlatBuffer, sums: torch.Tensor, weights: torch.Tensor, device, out=None) -> torch.Tensor:
    """``sums / weights`` per tensor; where a weight is 0 (no contributing worker) the result is 0."""
    weights = weights.double()
    if bool((weights == weights[0]).all()):  # one weight for every tensor (plain means): a scalar
        value = float(weights[0])
        if out is None:
            return sums / value if value > 0 else torch.zeros_like(sums)
        return out.div_(value) if value > 0 else out.zero_()
    safe = torch.where(weights > 0, weights, torch.ones_like(weights))
    scale = _per_element(flat, (weights > 0).double() / safe, device).to(sums.dtype)
    if out is None:
        return sums * scale
    return out.mul_(scale)


def _combine(part: Part, key, flat: FlatBuffer, pieces: List[torch.Tensor], node_weights: torch.Tensor,
             totals: torch.Tensor, device) -> None:
    """``c = sum_n W_n (r + decode(d_n)) / sum_n W_n`` in float32, in node order, per tensor."""
    ref = (part.refs or {}).get(key)
    reference = ref.float() if ref is not None else None
    total = torch.zeros(flat.numel, dtype=torch.float32, device=device)
    for node in range(node_weights.shape[0]):
        w = node_weights[node].tolist()
        if not any(w):
            continue
        payload = [piece[node] for piece in pieces]
        for o, n, weight in zip(flat.offsets, flat.numels, w):  # decode and add back in one pass per tensor
            part.codec.decode_into(payload, total[o:o + n], None if reference is None else reference[o:o + n],
                                   alpha=weight, accumulate=True, start=o)
    part.out[key].copy_(_divide(flat, total, totals, device))
