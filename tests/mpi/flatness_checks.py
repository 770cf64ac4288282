"""Flatness under 4 ranks: spread over a process set, the same float as one process with the same seed."""
import horovod.torch as hvd
import pytest
import torch
from torch import nn

import horovod_leader as hl
from _common import check
from horovod_leader.flatness import hessian_trace, hutchinson_values, top_eigenvalue
from horovod_leader.training.models import DigitsCNN

topo = hl.init(group_size=2)
rank = topo.rank
world = hvd.global_process_set


def squared_error(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def everyone_has(value: float, name: str) -> bool:
    gathered = hvd.allgather(torch.tensor([value], dtype=torch.float64), name=name).tolist()
    return all(v == value for v in gathered)


# Every rank builds the same problem from the same seed (no broadcast needed).
gen = torch.Generator().manual_seed(0)
x = torch.randn(240, 40, generator=gen, dtype=torch.float64) @ (torch.eye(40, dtype=torch.float64) +
                                                                0.3 * torch.randn(40, 40, generator=gen,
                                                                                  dtype=torch.float64))
y = torch.randn(240, generator=gen, dtype=torch.float64)
linear = nn.Linear(40, 1, bias=False).double()
with torch.no_grad():
    linear.weight.copy_(torch.randn(1, 40, generator=gen, dtype=torch.float64))
batches = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 240, 40)]  # 6 batches: uneven over 4 ranks

with check("trace_equals_single_process"):
    single = hutchinson_values(linear, squared_error, batches, samples=30, seed=5)
    spread = hutchinson_values(linear, squared_error, batches, samples=30, seed=5, process_set=world)
    assert spread == single  # each probe drawn from (seed, s) alone, joined exactly
    trace = hessian_trace(linear, squared_error, batches, samples=30, seed=5, process_set=world)
    assert trace == hessian_trace(linear, squared_error, batches, samples=30, seed=5)
    assert everyone_has(trace, "test.flat.trace")

with check("top_eigenvalue_equals_single_process"):
    single = top_eigenvalue(linear, squared_error, batches, iters=30, seed=5)
    spread = top_eigenvalue(linear, squared_error, batches, iters=30, seed=5, process_set=world)
    # The batches' products are summed in another order: equal up to float64 rounding.
    assert spread == pytest.approx(single, rel=1e-10), (spread, single)
    assert everyone_has(spread, "test.flat.eig")

with check("cnn_equals_single_process"):
    torch.manual_seed(1)
    cnn = DigitsCNN()
    images = torch.randn(96, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (96,), generator=gen)
    data = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    cnn.train()
    trace = hessian_trace(cnn, cross_entropy, data, samples=8, seed=2, process_set=world)
    assert trace == hessian_trace(cnn, cross_entropy, data, samples=8, seed=2)
    top = top_eigenvalue(cnn, cross_entropy, data, iters=10, seed=2, process_set=world)
    assert top == pytest.approx(top_eigenvalue(cnn, cross_entropy, data, iters=10, seed=2), rel=1e-4)
    assert everyone_has(trace, "test.flat.cnn.trace") and everyone_has(top, "test.flat.cnn.eig")
    assert cnn.training

with check("group_process_set"):
    # Each group of 2 works on its own: group 1 with another seed than group 0.
    seed = 5 + topo.group
    trace = hessian_trace(linear, squared_error, batches, samples=12, seed=seed, process_set=topo.process_set)
    assert trace == hessian_trace(linear, squared_error, batches, samples=12, seed=seed)
    top = top_eigenvalue(linear, squared_error, batches, iters=20, seed=seed, process_set=topo.process_set)
    assert top == pytest.approx(top_eigenvalue(linear, squared_error, batches, iters=20, seed=seed), rel=1e-10)

with check("bad_arguments_on_every_rank"):
    # Only rank 1 is wrong; every rank raises (no rank waits in a collective for it).
    with pytest.raises(ValueError, match="rank 1: samples must be an integer"):
        hessian_trace(linear, squared_error, batches, samples=0 if rank == 1 else 10, process_set=world)
    with pytest.raises(ValueError, match="rank 2: batches is empty"):
        top_eigenvalue(linear, squared_error, [] if rank == 2 else batches, process_set=world)
    with pytest.raises(ValueError, match=r"disagree on number of batches: \[6, 6, 6, 5\]"):
        hessian_trace(linear, squared_error, batches[:5] if rank == 3 else batches, samples=4, process_set=world)
    with pytest.raises(ValueError, match="disagree on seed"):
        top_eigenvalue(linear, squared_error, batches, iters=3, seed=rank % 2, process_set=world)
    # Horovod is still usable afterwards: nothing was left half-done.
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.flat.alive").item() == 4.0

hvd.shutdown()
