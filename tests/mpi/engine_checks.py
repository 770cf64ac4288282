"""Every wrapper on the torch engine (torch.distributed over Gloo), launched by torchrun
(4 ranks, groups of 2). One representative per kind of multi-rank check, each for every wrapper:

* engine_is_torch: ``hl.init`` chose the torch engine under torchrun; the groups are blocks of 2.
* exact_*: one run of every wrapper against the hand computation of ``_rounds_model`` (the same
  checks as the Horovod engine's ``overlap_checks``, d = 0 and d = 2); data-parallel SGD against
  SGD on the mean gradient.
* uneven_*: rank 0 stops after 3 steps, the others after 9: every rank closes, none hangs.
* nan_*: rank 2's parameters become NaN: it is reset at the next round and everything ends finite.
* resume_*: a state_dict taken at step 5 and loaded into fresh objects continues bitwise.
* async_*: the asynchronous LSGD, GRAWA and EASGD, their rounds counted by the TCP step counter.
* compressed_*: LSGD int8 and GRAWA bf16 against the uncompressed run, within the codec's rounding.
* dp_habits: ``backward_passes_per_step``, ``synchronize()`` then ``skip_synchronize()``.
* one_sided_refused: the one-sided EASGD needs MPI windows and says so, naming ``--backend``.
"""
import math

import pytest
import torch
from torch import nn

import horovod_leader as hl
from _common import check, collectives, value
from _rounds_model import LR, WRAPPERS, grad, run, simulate, start, weights

topo = hl.init(group_size=2)
rank, size = topo.rank, topo.size
engine = collectives()

with check("engine_is_torch"):
    assert hl.engine.name() == "torch" and topo.groups == [[0, 1], [2, 3]], (hl.engine.name(), topo.groups)
    assert topo.comm is None and topo.node_sets("cpu") is not None  # subgroups, no MPI communicator

for d in (0, 2):
    for name, make in WRAPPERS.items():
        with check(f"exact_d{d}_{name}"):
            model, opt = run(make, rank, d)
            error = float((weights(model) - simulate(name, d)[rank]).abs().max())
            value(f"exact_d{d}_{name}", f"max_error={error:.2e}")
            assert error < 1e-5, (name, d, error)
            opt.close()

with check("exact_dp"):
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(start(0).float().view(1, 4))
    opt = hl.DataParallel(torch.optim.SGD(model.parameters(), lr=LR), model)
    x = start(0)
    for _ in range(5):
        model.weight.grad = grad(rank, weights(model)).float().view(1, 4)
        opt.step(1.0)
        x = x - LR * sum(grad(r, x) for r in range(size)) / size
    assert float((weights(model) - x).abs().max()) < 1e-5
    opt.close()

EVERY = {**{name: (lambda make: lambda o, m: make(o, m, 0))(make) for name, make in WRAPPERS.items()},
         "dp": lambda o, m: hl.DataParallel(o, m)}


def toy(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def steps(model, opt, count, poison_at=None):
    for step in range(1, count + 1):
        torch.manual_seed(100 * rank + step)
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        opt.zero_grad()
        loss.backward()
        if poison_at == step:
            with torch.no_grad():
                model[0].weight.fill_(math.nan)
        opt.step(loss)


for name, make in EVERY.items():
    with check(f"uneven_{name}"):
        model, inner = toy(rank)
        with make(inner, model) as opt:
            steps(model, opt, 3 if rank == 0 else 9)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

for name, make in EVERY.items():
    if name == "dp":
        continue  # a NaN averaged gradient: data-parallel SGD raises on every rank (tested with Horovod)
    with check(f"nan_{name}"):
        model, inner = toy(rank)
        opt = make(inner, model)
        steps(model, opt, 12, poison_at=5 if rank == 2 else None)
        opt.close()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), name
        if rank == 2:
            assert opt.recoveries >= 1, name

for name, make in EVERY.items():
    with check(f"resume_{name}"):
        model, inner = toy(0)
        opt = make(inner, model)
        steps(model, opt, 5)
        saved_model, saved = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
        steps(model, opt, 6)
        whole = [p.detach().clone() for p in model.parameters()]
        opt.close()
        model, inner = toy(0)
        opt = make(inner, model)
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved)
        steps(model, opt, 6)
        assert all(torch.equal(a, b) for a, b in zip(whole, model.parameters())), name
        opt.close()

ASYNC = {"lsgd": lambda o, m: hl.LSGD(o, m, period=2, global_period=4, asynchronous=True),
         "grawa": lambda o, m: hl.GRAWA(o, m, period=2, asynchronous=True),
         "easgd": lambda o, m: hl.EASGD(o, m, period=2, asynchronous=True)}
for name, make in ASYNC.items():
    with check(f"async_{name}"):
        model, inner = toy(rank)
        with make(inner, model) as opt:
            steps(model, opt, 6 + 4 * rank)
        assert len(opt.rounds_history) > 0 and all(bool(torch.isfinite(p).all()) for p in model.parameters())

for name, make in {"lsgd_int8": lambda o, m, c: hl.LSGD(o, m, period=2, global_period=4, compression=c),
                   "grawa_bf16": lambda o, m, c: hl.GRAWA(o, m, period=2, compression=c)}.items():
    with check(f"compressed_{name}"):
        kind = name.rsplit("_", 1)[1]
        results = []
        for codec in (None, kind):
            model, inner = toy(rank)
            opt = make(inner, model, codec)
            steps(model, opt, 4)
            opt.close()
            results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        error = float((results[0] - results[1]).abs().max())
        value(f"compressed_{name}", f"max_error={error:.2e}")
        # a leader is never pulled toward a compressed copy, so its own error may be 0; the others' is not
        everyone = engine.allgather(torch.tensor([[error]], dtype=torch.float64), name=f"test.{name}.errors")
        assert 0 < float(everyone.max()) and float(everyone.max()) < 0.05, everyone.reshape(-1).tolist()

with check("dp_habits"):
    model, inner = toy(0)
    opt = hl.DataParallel(inner, model, backward_passes_per_step=2)
    for _ in range(2):  # two backward passes accumulate locally, then one average
        nn.functional.cross_entropy(model(torch.randn(8, 6) + rank), torch.zeros(8, dtype=torch.long)).backward()
    local = engine.allgather(model[0].weight.grad.detach().clone().reshape(1, -1), name="test.dp.local")
    opt.synchronize()
    grads = engine.allgather(model[0].weight.grad.reshape(1, -1), name="test.dp.grads")
    assert all(torch.equal(grads[0], row) for row in grads)  # alike on every rank
    assert torch.allclose(grads[0], local.mean(0), atol=1e-6), (grads[0], local.mean(0))  # the mean of the sums
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with opt.skip_synchronize():
        opt.step(1.0)
    assert opt.comm_bytes == sum(p.numel() * 4 for p in model.parameters())
    opt.close()

with check("one_sided_refused"):
    model, inner = toy(0)
    with pytest.raises(ValueError, match="--backend horovod"):
        hl.OneSidedEASGD(inner, model)
