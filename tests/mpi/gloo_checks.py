"""Under `horovodrun --gloo -np 4` on one host: the topology without MPI, the refusal of the
asynchronous variants, and every synchronous wrapper working over Gloo."""
import horovod.torch as hvd
import pytest
import torch
from torch import nn

import horovod_leader as hl
from horovod_leader.launcher import MPIRequired, NO_MPI_FIX, launched_by_mpi
from _common import check

assert not launched_by_mpi(), "this program runs under horovodrun --gloo"

topo = hl.init()
rank = topo.rank

with check("host_group"):
    # One host: one group of four, Horovod's global set, and no MPI communicator.
    assert topo.size == 4 and hvd.size() == 4
    assert topo.groups == [[0, 1, 2, 3]]
    assert topo.process_set == hvd.global_process_set
    assert topo.comm is None

with check("blocks_and_group_broadcast"):
    topo = hl.init(group_size=2)
    assert topo.groups == [[0, 1], [2, 3]] and topo.group == rank // 2 and topo.comm is None
    value = torch.tensor([float(rank * 10)])
    root = topo.group_ranks[-1]
    hvd.broadcast_(value, root_rank=root, process_set=topo.process_set, name="test.group_bcast")
    assert value.item() == root * 10
    assert hvd.allgather(value, name="test.gather").tolist() == [10.0, 10.0, 30.0, 30.0]
    # Other groupings, and the same one again: Horovod is initialised once, its sets reused.
    assert hl.init(group_size=1).groups == [[0], [1], [2], [3]]
    again = hl.init(group_size=2)
    assert again.process_set.process_set_id == topo.process_set.process_set_id

with check("bad_arguments"):
    for bad in (3, 0, -2, 2.5, "2", True):
        with pytest.raises(ValueError, match="group_size"):
            hl.init(group_size=bad)
    with pytest.raises(ValueError, match="comm"):
        hl.init(comm=object())
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.alive").item() == 4.0


def tiny():
    torch.manual_seed(rank)  # different starting points, so that the rounds have work to do
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def train(opt, model, steps=8):
    torch.manual_seed(100 + rank)
    for _ in range(steps):
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss)


def gathered(model, name):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return hvd.allgather(flat.unsqueeze(0), name=name)


with check("async_refused"):
    # The asynchronous variants need MPI's one-sided counter: every rank stops at construction,
    # with the cause and the fix, before anything is left waiting.
    model = tiny()
    for make in (lambda o: hl.LSGD(o, model, period=2, asynchronous=True),
                 lambda o: hl.GRAWA(o, model, period=2, asynchronous=True),
                 lambda o: hl.EASGD(o, model, period=2, asynchronous=True)):
        with pytest.raises(MPIRequired, match=NO_MPI_FIX) as refused:
            make(torch.optim.SGD(model.parameters(), lr=0.1))
        assert "Gloo mode" in str(refused.value)
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.alive_after_refusal").item() == 4.0

with check("synchronous_wrappers"):
    topo = hl.init(group_size=2)
    for name, make in (("lsgd_two_groups", lambda o, m: hl.LSGD(o, m, period=2, global_period=4, topology=topo)),
                       ("grawa", lambda o, m: hl.GRAWA(o, m, period=2)),
                       ("easgd", lambda o, m: hl.EASGD(o, m, period=2)),
                       ("localsgd", lambda o, m: hl.LocalSGD(o, m, period=2)),
                       ("dp", lambda o, m: hl.DataParallel(o, m))):
        model = tiny()
        with make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model) as opt:
            train(opt, model)
            assert opt.comm_bytes > 0, name
            if name == "lsgd_two_groups":
                assert opt.global_leader in range(4) and opt.local_leader in topo.group_ranks
            state = opt.state_dict()
            opt.load_state_dict(state)
        rows = gathered(model, f"test.params.{name}")
        assert torch.isfinite(rows).all(), name
        if name == "localsgd":
            # Eight steps, a round every two: the last step was a round, so every worker holds
            # the same average.
            assert torch.equal(rows, rows[:1].expand_as(rows)), name
    # LSGD with one group (plain LSGD, the global leader only).
    topo1 = hl.init()
    model = tiny()
    with hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.05), model, period=2, topology=topo1) as opt:
        train(opt, model)
        assert opt.global_leader in range(4)

hvd.shutdown()
