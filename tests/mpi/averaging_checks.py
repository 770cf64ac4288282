"""GRAWA, EASGD, LocalSGD and DataParallel under 4 ranks: hand-computed rounds, edge cases,
the symmetry trap against LSGD, communication volume, checkpoints and bad arguments."""
import copy

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import horovod_leader as hl
from _common import check

topo = hl.init(group_size=4)
rank, size = topo.rank, topo.size
H4 = 1 + 1 / 2 + 1 / 3 + 1 / 4


def linear(weight: float, bias=None, n: int = 3) -> nn.Module:
    model = nn.Linear(n, 1, bias=bias is not None)
    with torch.no_grad():
        model.weight.fill_(weight)
        if bias is not None:
            model.bias.fill_(bias)
    return model


def set_grads(model, *values):
    for p, v in zip(model.parameters(), values):
        p.grad = torch.full_like(p, v)


def gather(t: torch.Tensor, name: str) -> torch.Tensor:
    return hvd.allgather(t.detach().reshape(1, -1), name=name)


with check("mgrawa_centre"):
    model = linear(rank + 1)
    opt = hl.GRAWA(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, pull=1.0)
    set_grads(model, float(rank + 1))  # norm proportional to r + 1
    opt.step(0.0)
    assert torch.allclose(model.weight, torch.full((1, 3), 4 / H4), rtol=1e-6), model.weight
    assert abs(float(opt.last_weights) - (1 / (rank + 1)) / H4) < 1e-12

with check("grawa_fresh_gradient_weights"):
    # The step's own gradients are zero on every rank (equal weights would give the plain mean
    # 2.5); the fresh loss on a fixed batch has gradient 6 (r + 1) in each of 3 entries, so
    # norms proportional to r + 1 and the centre 4 / H4, as computed by hand.
    model = linear(rank + 1)
    x_fixed = torch.ones(4, 3)
    opt = hl.GRAWA(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, pull=1.0,
                   fresh_loss=lambda m: m(x_fixed).pow(2).mean())
    set_grads(model, 0.0)
    opt.step(0.0)
    assert torch.allclose(model.weight, torch.full((1, 3), 4 / H4), rtol=1e-6), model.weight
    assert abs(float(opt.last_weights) - (1 / (rank + 1)) / H4) < 1e-9
    assert torch.equal(model.weight.grad, torch.zeros(1, 3))  # .grad untouched
    with pytest.raises(ValueError, match="fresh_loss"):
        hl.GRAWA(torch.optim.SGD(model.parameters(), lr=0.0), model, fresh_loss=3)

with check("lgrawa_per_tensor_weights"):
    # weight gradients rank the workers 0 < 1 < 2 < 3, bias gradients the other way round
    for layerwise in (True, False):
        model = linear(rank + 1, bias=10.0 * (rank + 1), n=2)
        opt = hl.GRAWA(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, pull=1.0, layerwise=layerwise)
        set_grads(model, float(rank + 1), 1.0 / (rank + 1))
        opt.step(0.0)
        if layerwise:
            assert torch.allclose(model.weight, torch.full((1, 2), 4 / H4), rtol=1e-6), model.weight
            # bias weights are proportional to r + 1: sum (r+1) * 10 (r+1) / sum (r+1) = 30
            assert torch.allclose(model.bias, torch.tensor([30.0]), rtol=1e-6), model.bias
            assert opt.last_weights.shape == (2,)
        else:
            assert not torch.allclose(model.weight, torch.full((1, 2), 4 / H4), rtol=1e-3)

with check("grawa_norm_edge_cases"):
    # The optimizer holds only the bias (gradient 0), so the weight's odd gradients reach the
    # norms without the optimizer's step turning the weight itself into NaN.
    def edge_case(weight_grad):
        model = linear(rank + 1, bias=0.0)
        opt = hl.GRAWA(torch.optim.SGD([model.bias], lr=0.1), model, period=1, pull=1.0)
        set_grads(model, weight_grad, 0.0)
        opt.step(0.0)
        assert torch.isfinite(model.weight).all() and torch.isfinite(opt.last_weights).all()
        return model.weight

    # rank 1's gradient is zero, rank 2's NaN: finite weights; the zero-norm worker dominates
    # and the NaN one does not count (it is reset to the centre).
    assert torch.allclose(edge_case([1.0, 0.0, float("nan"), 1.0][rank]), torch.full((1, 3), 2.0), rtol=1e-6)
    # every norm non-finite: no healthy worker is left, and every rank says so
    with pytest.raises(hl.AllWorkersDiverged, match="every worker diverged at step 1"):
        edge_case(float("inf"))

with check("grawa_equals_localsgd"):
    results = []
    for make in (lambda o, m: hl.GRAWA(o, m, period=2, pull=1.0), lambda o, m: hl.LocalSGD(o, m, period=2)):
        model = linear(rank + 1)
        opt = make(torch.optim.SGD(model.parameters(), lr=0.1), model)
        for step in range(4):
            set_grads(model, 2.0 + step)  # equal norms on every rank
            opt.step(1.0)
        results.append(model.weight.detach().clone())
    assert torch.equal(results[0], results[1]), results
    assert torch.equal(gather(results[1], "test.local")[0], gather(results[1], "test.local2")[rank])

with check("easgd_formula"):
    model = linear(rank + 1)
    opt = hl.EASGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, beta=0.9, alpha=0.2)
    centre0 = next(iter(opt.centre().values())).clone()
    assert torch.allclose(centre0, torch.full((3,), 2.5))  # the average at construction
    with torch.no_grad():
        model.weight.mul_(2.0)  # workers now at 2 (r + 1): mean 5, centre still 2.5
    x = model.weight.detach().clone()
    set_grads(model, 0.0)
    opt.step(0.0)
    assert torch.allclose(model.weight, x - 0.2 * (x - 2.5)), model.weight
    assert torch.allclose(next(iter(opt.centre().values())), torch.full((3,), 0.1 * 2.5 + 0.9 * 5.0))
    assert hl.EASGD(torch.optim.SGD(model.parameters(), lr=0.0), model, beta=0.8).alpha == pytest.approx(0.2)


class Quartic(nn.Module):
    def __init__(self, start):
        super().__init__()
        self.x = nn.Parameter(start.clone())

    def forward(self):
        return ((self.x ** 2 - 1) ** 2).sum()


with check("symmetry_trap"):
    f = lambda x: float(((x ** 2 - 1) ** 2).sum())
    base = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    start = base[rank % 2] * (1 if rank < 2 else -1)  # mirrored: the workers' average is x = 0
    methods = {
        "easgd": lambda o, m: hl.EASGD(o, m, period=4, beta=0.9),
        "localsgd": lambda o, m: hl.LocalSGD(o, m, period=4),
        "lsgd": lambda o, m: hl.LSGD(o, m, period=4, global_period=4, global_pull=0.1),
    }
    finals = {}
    for name, make in methods.items():
        model = Quartic(start)
        opt = make(torch.optim.SGD(model.parameters(), lr=0.02), model)
        for _ in range(200):
            loss = model()
            opt.zero_grad()
            loss.backward()
            opt.step(loss)
        workers = gather(model.x, f"test.sym.{name}")
        centre = next(iter(opt.centre().values())) if name == "easgd" else workers.mean(0)
        finals[name] = (workers, centre)
    for name in ("easgd", "localsgd"):
        workers, centre = finals[name]
        assert f(centre) > 7.9, (name, f(centre))  # stuck at the maximum between the basins
        assert min(f(w) for w in workers) > 0.05, (name, [f(w) for w in workers])  # held away from the minima
    workers, centre = finals["lsgd"]
    assert max(f(w) for w in workers) < 1e-6 and (workers - workers[0]).abs().max() < 1e-3

with check("comm_volume"):
    def run(make, steps=16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 4))
        opt = make(torch.optim.SGD(model.parameters(), lr=0.01), model)
        start = opt.comm_bytes
        for _ in range(steps):
            loss = model(torch.randn(8, 40)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss)
        return (opt.comm_bytes - start) / steps, sum(p.numel() * 4 for p in model.parameters())

    per_step, P = run(lambda o, m: hl.DataParallel(o, m))
    assert per_step == P
    for name, make, rounds in [("localsgd", lambda o, m: hl.LocalSGD(o, m, period=4), 4),
                               ("easgd", lambda o, m: hl.EASGD(o, m, period=4), 4),
                               ("mgrawa", lambda o, m: hl.GRAWA(o, m, period=4), 4),
                               ("lgrawa", lambda o, m: hl.GRAWA(o, m, period=4, layerwise=True), 4),
                               ("lsgd", lambda o, m: hl.LSGD(o, m, period=4, global_period=4), 4),
                               ("diloco", lambda o, m: hl.DiLoCo(o, m, period=4), 4)]:
        per_step, P = run(make)
        total = per_step * 16
        # about P per round: the payload plus a few bytes of norms, counts or scores
        assert rounds * P <= total <= rounds * P + rounds * 100, (name, total, rounds * P)

with check("checkpoint_round_trip"):
    for name, make in [("easgd", lambda o, m: hl.EASGD(o, m, period=2)),
                       ("grawa", lambda o, m: hl.GRAWA(o, m, period=2, prox=0.1, norm_decay=0.43)),
                       # the reference that compressed rounds send differences from is state too
                       ("localsgd_int8", lambda o, m: hl.LocalSGD(o, m, period=2, compression="int8")),
                       ("grawa_bf16", lambda o, m: hl.GRAWA(o, m, period=2, compression="bf16"))]:
        torch.manual_seed(rank)
        model = nn.Linear(5, 2)
        opt = make(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
        data = [torch.randn(4, 5) for _ in range(8)]

        def train(m, o, batches):
            for x in batches:
                loss = m(x).pow(2).mean()
                o.zero_grad()
                loss.backward()
                o.step(loss)

        train(model, opt, data[:3])
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        twin = nn.Linear(5, 2)
        twin_opt = make(torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), twin)
        twin.load_state_dict(saved[0])
        twin_opt.load_state_dict(saved[1])
        train(model, opt, data[3:])
        train(twin, twin_opt, data[3:])
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())), name

with check("bad_arguments"):
    model = linear(1.0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [(hl.GRAWA, {"period": 0}, "period"), (hl.GRAWA, {"pull": 1.5}, "pull"),
             (hl.GRAWA, {"norm_decay": 1.0}, "norm_decay"), (hl.GRAWA, {"prox": -1}, "prox"),
             (hl.GRAWA, {"layerwise": "yes"}, "layerwise"), (hl.EASGD, {"beta": 0.0}, "beta"),
             (hl.EASGD, {"alpha": 1.5}, "alpha"), (hl.LocalSGD, {"period": 2.0}, "period"),
             (hl.DiLoCo, {"outer_lr": 0.0}, "outer_lr"), (hl.DiLoCo, {"outer_momentum": 1.0}, "outer_momentum"),
             (hl.DiLoCo, {"outer_momentum": 0.0}, "nesterov"), (hl.DiLoCo, {"period": -1}, "period"),
             (hl.LocalSGD, {"compression": "fp8"}, "compression"), (hl.LSGD, {"compression": "int4"}, "compression"),
             (hl.GRAWA, {"compression": 8}, "compression"), (hl.EASGD, {"compression": "BF16"}, "compression")]
    for cls, kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            cls(sgd, model, **kwargs)
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.alive").item() == 4.0

hvd.shutdown()
