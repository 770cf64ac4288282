"""Unhealthy workers never enter an average; when every worker diverges, every rank stops (4 ranks).

* batchnorm_nan_*: a model with BatchNorm, one NaN sample on rank 1 at one step, under LSGD
  (one and two groups), GRAWA, EASGD, LocalSGD and DiLoCo, and compressed LSGD, GRAWA and
  LocalSGD, synchronous and asynchronous where offered:
  afterwards every rank's parameters and floating buffers are finite.
* all_diverged_*: every rank's parameters NaN at the same step, under every wrapper: every
  rank raises ``AllWorkersDiverged`` naming the step; DataParallel raises it for a non-finite
  averaged gradient.
* one_sided_easgd_*: the EASGD paper's asynchronous EASGD: the centre against a hand
  computation with a fixed order of updates; a run with rank 3 three times slower that joins
  no Horovod collective and closes cleanly.
"""
import math
import time

import horovod.torch as hvd
import torch
from mpi4py import MPI
from torch import nn

import horovod_leader as hl
from _common import check, value

topo = hl.init(group_size=4)
rank, size = topo.rank, topo.size

WRAPPERS = {
    "lsgd1": (4, lambda o, m, a: hl.LSGD(o, m, period=2, global_period=2, asynchronous=a)),
    "lsgd2": (2, lambda o, m, a: hl.LSGD(o, m, period=2, global_period=4, asynchronous=a)),
    "grawa": (4, lambda o, m, a: hl.GRAWA(o, m, period=2, pull=0.5, asynchronous=a)),
    "easgd": (4, lambda o, m, a: hl.EASGD(o, m, period=2, beta=0.9, asynchronous=a)),
    "localsgd": (4, lambda o, m, a: hl.LocalSGD(o, m, period=2)),
    "diloco": (4, lambda o, m, a: hl.DiLoCo(o, m, period=2)),
    # compressed rounds carry the health flags in an all-gather, and GRAWA's norms with them
    "lsgd2_int8": (2, lambda o, m, a: hl.LSGD(o, m, period=2, global_period=4, asynchronous=a, compression="int8")),
    "grawa_int8": (4, lambda o, m, a: hl.GRAWA(o, m, period=2, pull=0.5, asynchronous=a, compression="int8")),
    "localsgd_bf16": (4, lambda o, m, a: hl.LocalSGD(o, m, period=2, compression="bf16")),
}
SYNCHRONOUS_ONLY = {"localsgd", "diloco", "localsgd_bf16"}


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def finite_state(model) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point())


for name, (group_size, make) in WRAPPERS.items():
    for asynchronous in ((False,) if name in SYNCHRONOUS_ONLY else (False, True)):
        label = f"batchnorm_nan_{name}_{'async' if asynchronous else 'sync'}"
        with check(label):
            hl.init(group_size=group_size)
            model = bn_model()
            opt = make(torch.optim.SGD(model.parameters(), lr=0.05), model, asynchronous)
            data = torch.Generator().manual_seed(rank)
            steps = 12
            for step in range(1, steps + 1):
                x, y = torch.randn(16, 5, generator=data), torch.randint(0, 3, (16,), generator=data)
                if rank == 1 and step == 3:
                    x[0, 0] = math.nan  # one NaN sample on one rank
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                if rank == 1 and step == 3:
                    # the fault really happened (checked before the step: an asynchronous round
                    # completing inside this step may already reset the worker)
                    assert not torch.isfinite(loss) and not finite_state(model)
                opt.step(loss)
            opt.close()
            if asynchronous:  # rounds may still be landing on the others: one more round trip
                hvd.allreduce(torch.zeros(1), name=f"test.settle.{label}")
            finite = hvd.allgather(torch.tensor([float(finite_state(model))]), name=f"test.{label}").tolist()
            recoveries = hvd.allgather(torch.tensor([opt.recoveries]), name=f"test.rec.{label}").tolist()
            value(label, f"finite_on_ranks={finite} recoveries={recoveries}")
            assert finite == [1.0] * size, finite
            assert recoveries[1] >= 1 and recoveries[0] == recoveries[2] == recoveries[3] == 0, recoveries


def diverge_everywhere(label: str, opt, model, at_step: int, asynchronous: bool = False):
    """NaN parameters on every rank from ``at_step`` on; expect AllWorkersDiverged everywhere.

    Synchronous: within 40 steps. Asynchronous: within 30 seconds, since a rank may take many
    cheap steps while the round that finds every worker diverged is still in flight."""
    deadline = time.monotonic() + 30.0
    step = 0
    while (time.monotonic() < deadline) if asynchronous else step < 40:
        step += 1
        loss = model(torch.ones(2, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step >= at_step:  # and stays so: asynchronous rounds may otherwise reset some ranks first
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
        try:
            opt.step(loss)
            if asynchronous:
                time.sleep(0.001 * rank)
        except hl.AllWorkersDiverged as error:
            message = str(error)
            assert not asynchronous or "asynchronous round" in message or "round" in message, message
            assert "every worker diverged at step" in message and "lower learning rate" in message, message
            value(label, f"raised at step {opt.steps}: {message[:90]}...")
            return opt.steps
    raise AssertionError(f"{label}: no AllWorkersDiverged within {step} steps")


for name, (group_size, make) in WRAPPERS.items():
    for asynchronous in ((False,) if name in SYNCHRONOUS_ONLY else (False, True)):
        label = f"all_diverged_{name}_{'async' if asynchronous else 'sync'}"
        with check(label):
            hl.init(group_size=group_size)
            torch.manual_seed(0)
            model = nn.Linear(3, 1)
            opt = make(torch.optim.SGD(model.parameters(), lr=0.01), model, asynchronous)
            raised = diverge_everywhere(label, opt, model, at_step=5, asynchronous=asynchronous)
            if not asynchronous:  # synchronous: the same step on every rank, the first round after the fault
                steps = hvd.allgather(torch.tensor([raised]), name=f"test.{label}").tolist()
                assert len(set(steps)) == 1 and steps[0] <= 8, steps

with check("all_diverged_dp"):
    hl.init(group_size=4)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = hl.DataParallel(torch.optim.SGD(model.parameters(), lr=0.01), model)
    loss = model(torch.ones(2, 3)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step(loss)
    before = model.weight.detach().clone()
    # one rank's NaN gradient makes the average NaN on every rank
    loss = model(torch.ones(2, 3) * (math.nan if rank == 2 else 1.0)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    try:
        opt.step(loss)
        raise AssertionError("DataParallel stepped into a NaN average")
    except hl.AllWorkersDiverged as error:
        assert "averaged gradient is not finite" in str(error) and "at step 2" in str(error), str(error)
    assert torch.equal(model.weight, before)  # it did not step

comm = MPI.COMM_WORLD
with check("one_sided_easgd_centre_arithmetic"):
    hl.init(group_size=4)
    model = nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(float(rank + 1))
    opt = hl.OneSidedEASGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, alpha=0.5)
    # Fixed order: rank 0, 1, 2, 3, then 0, 1, 2, 3 again; each update sees the previous ones.
    centre, workers = 2.5, [1.0, 2.0, 3.0, 4.0]
    for turn in range(2 * size):
        owner = turn % size
        if rank == owner:
            model.weight.grad = torch.zeros_like(model.weight)
            opt.step(0.0)
        comm.Barrier()
        d = 0.5 * (workers[owner] - centre)
        workers[owner] -= d
        centre += d
    read = next(iter(opt.centre().values()))
    assert torch.allclose(read, torch.full((5,), centre), atol=1e-6), (read, centre)
    assert torch.allclose(model.weight, torch.full((1, 5), workers[rank]), atol=1e-6), (model.weight, workers)
    assert opt.comm_bytes == 0 and opt.one_sided_bytes > 0
    opt.close()

with check("one_sided_easgd_straggler"):
    hl.init(group_size=4)
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hl.OneSidedEASGD(torch.optim.SGD(model.parameters(), lr=0.05), model, period=4, beta=0.9)
    deadline = time.perf_counter() + 3.0
    while time.perf_counter() < deadline:
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        time.sleep(0.02 * (3 if rank == 3 else 1))  # long enough to dominate computation on a loaded machine
        opt.step(loss)
    during = opt.comm_bytes
    opt.close()
    steps = hvd.allgather(torch.tensor([opt.steps]), name="test.onesided.steps").tolist()
    value("one_sided_steps", steps)
    assert during == 0 and opt.one_sided_bytes > 0, (during, opt.one_sided_bytes)
    assert min(steps[:3]) >= 2 * steps[3], steps  # nobody waits for the straggler
    state = opt.state_dict()
    assert len(state["centre_shard"]) == 1 and all(torch.isfinite(t).all() for t in state["centre_shard"].values())

hvd.shutdown()
