"""Overlapped rounds and node-aware exchanges (4 ranks, 2 groups of 2 unless said).

* overlap_d0_*, overlap_d2_*: with ``overlap=0`` (the published method) and ``overlap=2``
  (rounds at steps 4 and 8, applied at 6 and 10), every wrapper against a hand computation in
  float64 (``_rounds_model``): each rank's gradient depends on its parameters, the round's
  correction is computed from the snapshot taken at its step and applied d steps later (LSGD:
  the leaders unpulled); tolerance 1e-5, float32 rounding over 10 steps.
* resume_mid_round_*: a run checkpointed at step 5, while the round of step 4 is in flight,
  and resumed in fresh objects, equals the uninterrupted run bitwise.
* node_average_equals_flat_*: the node-aware average (in-node sums, one exchange between the
  nodes' first ranks, in-node broadcast) equals the flat all-reduce up to float32 summation
  order; the tolerance is stated and measured (VALUE lines).
* node_compressed_*: with compression the links carry one payload per node; the centre is
  within the codec's rounding of the exact one.
* lsgd_node_broadcast_exact: LSGD's node-aware global broadcast delivers the leader's bytes.
"""
import math

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import horovod_leader as hl
from horovod_leader.comm import MPIGroup
from _common import check, value
from _rounds_model import LR, WRAPPERS, run, simulate, weights

topo = hl.init(group_size=2)
rank, size = topo.rank, topo.size
D = 2

for d in (0, D):
    for name, make in WRAPPERS.items():
        with check(f"overlap_d{d}_{name}"):
            model, opt = run(make, rank, d)
            expected = simulate(name, d)[rank]
            error = float((weights(model) - expected).abs().max())
            value(f"overlap_d{d}_{name}", f"max_error={error:.2e}")
            assert error < 1e-5, (name, d, weights(model), expected)
            opt.close()

with check("overlap_is_refused_where_it_cannot_be"):
    model = nn.Linear(4, 1, bias=False)
    with pytest.raises(ValueError, match=r"overlap=4 must be smaller than period=4"):
        hl.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), model, period=4, overlap=4)
    with pytest.raises(ValueError, match="asynchronous rounds already run while the workers step"):
        hl.GRAWA(torch.optim.SGD(model.parameters(), lr=LR), model, period=4, overlap=1, asynchronous=True)

for name, make in WRAPPERS.items():
    with check(f"resume_mid_round_{name}"):
        whole, whole_opt = run(make, rank, D)
        whole_opt.close()
        first, first_opt = run(make, rank, D, steps=5)  # the round of step 4 is in flight until step 6
        assert first_opt._in_flight is not None
        saved_model, saved = {k: v.clone() for k, v in first.state_dict().items()}, first_opt.state_dict()
        assert saved["in_flight"]["apply_at"] == 6
        first_opt.close()
        model = nn.Linear(4, 1, bias=False)
        opt = make(torch.optim.SGD(model.parameters(), lr=LR), model, D)
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved)
        run(make, rank, D, model=model, opt=opt, first=6)
        assert torch.equal(model.weight, whole.weight), (name, model.weight, whole.weight)
        opt.close()

# --------------------------------------------------------------------------- node-aware exchanges
flat_topology = hl.init(group_size=4)  # one group: the flat exchanges
node_topology = hl.init(group_size=2)  # two groups of two: one rank per node across the links
assert not flat_topology.node_aware and node_topology.node_aware and node_topology.leaders_set is not None


def one_round(make, topology):
    torch.manual_seed(7 + rank)
    model = nn.Sequential(nn.Linear(50, 40), nn.BatchNorm1d(40), nn.Linear(40, 3))
    opt = make(torch.optim.SGD(model.parameters(), lr=0.0), model, topology)
    loss = model(torch.randn(16, 50)).pow(2).mean()
    loss.backward()
    opt.step(loss)
    opt.close()
    centre = opt.centre()  # EASGD's centre variable; None where the centre is the workers' average
    ONE_ROUND_CENTRE[0] = None if centre is None else torch.cat([t.reshape(-1).float() for t in centre.values()])
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()] +
                     [b.detach().reshape(-1).float() for b in model.buffers() if b.is_floating_point()])


ONE_ROUND_CENTRE = [None]  # the last one_round's centre variable, where the method keeps one


AVERAGES = {
    "localsgd": lambda o, m, t, c=None: hl.LocalSGD(o, m, period=1, compression=c, topology=t),
    "mgrawa": lambda o, m, t, c=None: hl.GRAWA(o, m, period=1, pull=1.0, compression=c, topology=t),
    "lgrawa": lambda o, m, t, c=None: hl.GRAWA(o, m, period=1, pull=1.0, layerwise=True, compression=c, topology=t),
    "easgd": lambda o, m, t, c=None: hl.EASGD(o, m, period=1, compression=c, topology=t),
    "diloco": lambda o, m, t, c=None: hl.DiLoCo(o, m, period=1, compression=c, topology=t),
}
TOLERANCE = 1e-6  # relative to the largest value: float32 sums of 4 terms in another order
for name, make in AVERAGES.items():
    with check(f"node_average_equals_flat_{name}"):
        flat = one_round(make, flat_topology)
        node = one_round(make, node_topology)
        error = float((flat - node).abs().max() / flat.abs().max())
        value(f"node_average_error_{name}", f"{error:.2e}")
        assert error <= TOLERANCE, (name, error)
        # every rank holds the same bytes: the averaged workers, or EASGD's centre (its workers
        # are each pulled part of the way, so they differ)
        same = node if ONE_ROUND_CENTRE[0] is None else ONE_ROUND_CENTRE[0]
        everyone = hvd.allgather(same.reshape(1, -1), name=f"test.node.{name}")
        assert all(torch.equal(everyone[0], row) for row in everyone), "every rank holds the same bytes"

for kind in ("bf16", "int8"):
    with check(f"node_compressed_{kind}"):
        exact = one_round(lambda o, m, t: AVERAGES["localsgd"](o, m, t), node_topology)
        packed = one_round(lambda o, m, t: AVERAGES["localsgd"](o, m, t, kind), node_topology)
        error = float((exact - packed).abs().max())
        bound = hl.Compression.int8.max_error(exact) if kind == "int8" else hl.Compression.bf16.max_error(exact)
        value(f"node_compressed_{kind}", f"error={error:.2e} bound={bound:.2e}")
        assert error <= 2 * bound, (kind, error, bound)  # each node's mean is rounded once

with check("lsgd_node_broadcast_exact"):
    torch.manual_seed(rank)
    model = nn.Linear(30, 20)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, global_period=1)
    assert isinstance(opt._nodes.in_node, MPIGroup)  # in-node copies go over a private MPI communicator
    loss = model(torch.ones(2, 30)).sum() * 0.0 + (10.0 - rank)  # rank 3 has the lowest score
    loss.backward()
    opt.step(loss)
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    leader = hvd.broadcast(mine, root_rank=opt.global_leader, name="test.leader.params")
    copy = torch.cat([t.reshape(-1) for name_, t in sorted(opt._copies["global"].items()) if name_.startswith("param.")])
    assert opt.global_leader == 3 and torch.equal(copy, leader), (opt.global_leader, (copy - leader).abs().max())
    opt.close()


class Masked(nn.Module):
    """A batch-norm layer and an additive mask whose first entries are -inf from the start."""

    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(6, 4), nn.BatchNorm1d(4)
        mask = torch.zeros(4)
        mask[:2] = -math.inf
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.norm(self.linear(x)) + self.mask.clamp_min(-1e4)


def overlapped_run(make, topology, steps=10):
    torch.manual_seed(3 + rank)
    model = Masked()
    opt = make(torch.optim.SGD(model.parameters(), lr=0.05), model, topology)
    for step in range(steps):
        loss = model(torch.randn(8, 6)).pow(2).mean()
        model.zero_grad()
        loss.backward()
        opt.step(loss)
    opt.close()
    return model


OVERLAPPED = {
    "localsgd": lambda o, m, t: hl.LocalSGD(o, m, period=4, overlap=2, topology=t),
    "mgrawa": lambda o, m, t: hl.GRAWA(o, m, period=4, overlap=3, topology=t),
    "easgd": lambda o, m, t: hl.EASGD(o, m, period=4, overlap=1, topology=t),
    "diloco": lambda o, m, t: hl.DiLoCo(o, m, period=4, overlap=2, topology=t),
    "lsgd": lambda o, m, t: hl.LSGD(o, m, period=2, global_period=4, overlap=1, topology=t),
}
for name, make in OVERLAPPED.items():
    with check(f"overlap_node_aware_buffers_{name}"):
        node = overlapped_run(make, node_topology)
        flat = overlapped_run(make, flat_topology) if name != "lsgd" else None
        mask = node.mask
        assert torch.isinf(mask[:2]).all() and bool((mask[:2] < 0).all()) and torch.equal(mask[2:], torch.zeros(2)), \
            (name, mask)  # the constant entries survive the overlapped corrections
        assert all(bool(torch.isfinite(t).all()) for t in list(node.parameters()) + [node.norm.running_mean,
                                                                                    node.norm.running_var])
        assert int(node.norm.num_batches_tracked) == 10, int(node.norm.num_batches_tracked)  # the steps meanwhile kept
        if flat is not None:  # the node-aware average equals the flat one, up to float32 summation order
            error = max(float((a - b).abs().max()) for a, b in zip(node.state_dict().values(), flat.state_dict().values())
                        if a.is_floating_point() and bool(torch.isfinite(a).all()))
            value(f"overlap_node_vs_flat_{name}", f"max_error={error:.2e}")
            assert error < 1e-5, (name, error)

for name, make in OVERLAPPED.items():
    with check(f"overlap_uneven_close_{name}"):
        torch.manual_seed(rank)
        model = Masked()
        opt = make(torch.optim.SGD(model.parameters(), lr=0.05), model, node_topology)
        steps = 5 if rank == 0 else 11  # rank 0 closes while the round of step 4 is in flight
        with opt:
            for _ in range(steps):
                loss = model(torch.randn(8, 6)).pow(2).mean()
                model.zero_grad()
                loss.backward()
                opt.step(loss)
        assert opt._in_flight is None and all(bool(torch.isfinite(p).all()) for p in model.parameters())
