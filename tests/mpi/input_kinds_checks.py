"""Eight kinds of input that real models bring, under every wrapper (4 ranks).

1. nonfloat_*: a frozen int8 parameter, a bool mask buffer and an int16 counter buffer: never
   cast, averaged or pulled; the int8 parameter left alone; the counter copied from the
   round's source (rank 0 in averages, the leader in LSGD) or left alone (DataParallel, the
   one-sided EASGD, which send no buffers).
2. inf_mask_*: an additive -inf mask buffer: no divergence at period 1, the mask intact; also
   in a world of one; and a mask that *became* NaN is still a divergence (recovered).
3. half_*: float16 models: the averages accumulate in float32 (GRAWA with gradient norms near
   1e-5 would overflow float16), against float64 hand computations.
4. changed_*: a param group added, or a layer added to the model, after wrapping: the next
   step raises on every rank, naming the change; DataParallel also for requires_grad; LSGD
   follows a requires_grad change.
5. sparse_*: an nn.Embedding(sparse=True) trains under every wrapper; DataParallel's average
   equals the dense one's; a NaN in a sparse gradient is caught on its values.
6. broadcast_state_*: broadcast_optimizer_state of a fresh AdamW changes no parameter and
   leaves the state fresh; a root's momentum and learning rate reach every rank.
7. world_*: a state_dict from a world of 4 ranks in 2 groups, loaded with other groups or on 2
   ranks: refused on every rank, naming both worlds, where the state names ranks (LSGD, the
   one-sided EASGD); resumed where it does not.
8. disagree_*: ranks that build a wrapper with different settings: every rank raises,
   naming the argument and the values.
"""
import math

import horovod.torch as hvd
import torch
from mpi4py import MPI
from torch import nn

import horovod_leader as hl
from _common import check, value

topo = hl.init(group_size=4)
rank, size = topo.rank, topo.size

# name -> (group size, factory(optimizer, model, **overrides), asynchronous)
WRAPPERS = {
    "lsgd1": (4, lambda o, m, **kw: hl.LSGD(o, m, **{"period": 2, **kw}), False),
    "lsgd2": (2, lambda o, m, **kw: hl.LSGD(o, m, **{"period": 2, "global_period": 4, **kw}), False),
    "lsgd2_async": (2, lambda o, m, **kw: hl.LSGD(o, m, **{"period": 2, "global_period": 4, "asynchronous": True,
                                                            **kw}), True),
    "lsgd2_int8": (2, lambda o, m, **kw: hl.LSGD(o, m, **{"period": 2, "global_period": 4, "compression": "int8",
                                                           **kw}), False),
    "mgrawa": (4, lambda o, m, **kw: hl.GRAWA(o, m, **{"period": 2, **kw}), False),
    "lgrawa": (4, lambda o, m, **kw: hl.GRAWA(o, m, **{"period": 2, "layerwise": True, **kw}), False),
    "mgrawa_async": (4, lambda o, m, **kw: hl.GRAWA(o, m, **{"period": 2, "asynchronous": True, **kw}), True),
    "mgrawa_bf16": (4, lambda o, m, **kw: hl.GRAWA(o, m, **{"period": 2, "compression": "bf16", **kw}), False),
    "easgd": (4, lambda o, m, **kw: hl.EASGD(o, m, **{"period": 2, **kw}), False),
    "easgd_async": (4, lambda o, m, **kw: hl.EASGD(o, m, **{"period": 2, "asynchronous": True, **kw}), True),
    "easgd_onesided": (4, lambda o, m, **kw: hl.OneSidedEASGD(o, m, **{"period": 2, **kw}), True),
    "localsgd": (4, lambda o, m, **kw: hl.LocalSGD(o, m, **{"period": 2, **kw}), False),
    "localsgd_int8": (4, lambda o, m, **kw: hl.LocalSGD(o, m, **{"period": 2, "compression": "int8", **kw}), False),
    "diloco": (4, lambda o, m, **kw: hl.DiLoCo(o, m, **{"period": 2, **kw}), False),
    "dp": (4, lambda o, m, **kw: hl.DataParallel(o, m, **kw), False),
}
AVERAGING = ("mgrawa", "lgrawa", "mgrawa_bf16", "easgd", "localsgd", "localsgd_int8", "diloco")
LEFT_ALONE = ("dp", "easgd_onesided")  # no buffers travel


def gathered(tensor: torch.Tensor, name: str) -> list:
    return hvd.allgather(tensor.detach().double().reshape(1, -1).cpu(), name=name).tolist()


def build(name: str, optimizer, model, **overrides):
    group_size, make, _ = WRAPPERS[name]
    hl.init(group_size=group_size)
    return make(optimizer, model, **overrides)


def finite_floats(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


def train(opt, model, batches, loss_of):
    for x in batches:
        loss = loss_of(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step(loss)


# ---------------------------------------------------------------------------- 1. not floating point
class WithIntegers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.q = nn.Parameter(torch.full((3,), rank + 1, dtype=torch.int8), requires_grad=False)  # quantised, frozen
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("counter", torch.tensor([10 * rank], dtype=torch.int16))

    def forward(self, x):
        self.counter += 1
        return self.lin(x * self.mask.to(x.dtype)) + self.q.float().sum() * 0.0


for name, (_, _, asynchronous) in WRAPPERS.items():
    with check(f"nonfloat_{name}"):
        torch.manual_seed(0)
        model = WithIntegers()
        opt = build(name, torch.optim.SGD(model.lin.parameters(), lr=0.05, momentum=0.9), model)
        data = torch.Generator().manual_seed(rank)
        train(opt, model, [torch.randn(8, 3, generator=data) for _ in range(4)], lambda m, x: m(x).pow(2).mean())
        opt.close()
        assert model.q.dtype == torch.int8 and model.q.tolist() == [rank + 1] * 3, model.q  # left alone
        assert model.mask.dtype == torch.bool and model.mask.tolist() == [True, False, True], model.mask
        assert finite_floats(model)
        counters = [int(row[0]) for row in gathered(model.counter, f"test.counter.{name}")]
        value(f"nonfloat_{name}", f"counters={counters}")
        if name in LEFT_ALONE:
            assert counters == [10 * r + 4 for r in range(size)], counters
        elif not asynchronous:  # the last step (4) ends in a round (every level for LSGD): one source
            assert len(set(counters)) == 1, counters
            if name in AVERAGING:
                assert counters == [4] * size, counters  # rank 0's: 0 + 4 forward passes
            else:
                assert counters[0] in [10 * r + 4 for r in range(size)], counters  # the leader's


# ---------------------------------------------------------------------------- 2. buffers that hold -inf
class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("mask", torch.tensor([[0.0, -math.inf], [0.0, 0.0]]))

    def forward(self, x):
        logits = self.lin(x).view(-1, 2, 2) + self.mask
        return torch.softmax(logits, dim=-1).flatten(1)


MASK = [[0.0, -math.inf], [0.0, 0.0]]


def masked_run(name, steps=4, poison_at=None, **overrides):
    torch.manual_seed(0)
    model = Masked()
    opt = build(name, torch.optim.SGD(model.parameters(), lr=0.1), model, **overrides)
    data = torch.Generator().manual_seed(rank)
    for step in range(1, steps + 1):
        x = torch.randn(8, 3, generator=data)
        loss = (model(x) - 0.25).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if poison_at == step and rank == 1:
            model.mask[0, 1] = math.nan  # the -inf *became* NaN: divergence
        opt.step(loss)
    opt.close()
    return model, opt


PERIOD_ONE = {"lsgd1": {"period": 1, "global_period": 1}, "lsgd2": {"period": 1, "global_period": 2},
              "lsgd2_async": {"period": 1, "global_period": 2}, "lsgd2_int8": {"period": 1, "global_period": 2},
              "dp": {}}
for name in WRAPPERS:
    with check(f"inf_mask_{name}"):
        overrides = PERIOD_ONE.get(name, {"period": 1})
        if name.startswith("lsgd"):
            overrides = {**overrides, "prox": 0.1}  # the per-step pull of the mask toward the leader's too
        model, opt = masked_run(name, **overrides)
        assert model.mask.tolist() == MASK, model.mask
        assert finite_floats(model) and opt.recoveries == 0, (opt.recoveries, list(model.parameters()))

with check("inf_mask_world_of_one"):
    hl.init(comm=MPI.COMM_SELF)  # every rank its own world of one
    torch.manual_seed(0)
    model = Masked()
    opt = hl.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), model, period=1)
    train(opt, model, [torch.randn(4, 3) for _ in range(3)], lambda m, x: m(x).pow(2).mean())
    opt.close()
    assert hvd.size() == 1 and model.mask.tolist() == MASK
    hl.init(group_size=4)

for name in ("localsgd", "mgrawa", "lsgd1"):
    with check(f"inf_mask_became_nan_{name}"):
        model, opt = masked_run(name, steps=6, poison_at=2)
        recoveries = [int(row[0]) for row in gathered(torch.tensor([opt.recoveries]), f"test.rec.{name}")]
        value(f"inf_mask_became_nan_{name}", f"recoveries={recoveries}")
        assert recoveries == [0, 1, 0, 0], recoveries  # rank 1 diverged and was reset
        assert model.mask.tolist() == MASK, model.mask


# ---------------------------------------------------------------------------- 3. half precision
def half_round(name, lr, scale, **overrides):
    """One round at step 1 of a float16 Linear(4, 2) (initialised differently on every rank)
    under plain SGD, with the loss scaled by ``scale`` (1e-5: gradient norms near 1e-5);
    returns (parameters before the step, after the step (each rank's x_i, from SGD's rule),
    gradient norms per tensor, parameters after the round), flat, in float64."""
    torch.manual_seed(rank)
    model = nn.Linear(4, 2).half()
    opt = build(name, torch.optim.SGD(model.parameters(), lr=lr), model, **overrides)
    before = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    loss = model(torch.randn(3, 4).half()).float().sum() * scale
    opt.zero_grad()
    loss.backward()
    stepped = torch.cat([(p.detach() - lr * p.grad).double().reshape(-1) for p in model.parameters()])
    norms = torch.stack([p.grad.double().norm() for p in model.parameters()])
    opt.step(loss)
    after = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    opt.close()
    return before, stepped, norms, after


HALF = {  # name -> (lr, loss scale, wrapper settings)
    "mgrawa": (0.0, 1e-5, {"period": 1, "pull": 0.5}),
    "lgrawa": (0.0, 1e-5, {"period": 1, "pull": 0.5}),
    "localsgd": (0.1, 1.0, {"period": 1}),
    "easgd": (0.1, 1.0, {"period": 1, "beta": 0.9}),
    "diloco": (0.1, 1.0, {"period": 1, "outer_lr": 0.7, "outer_momentum": 0.0, "nesterov": False}),
}
for name, (lr, scale, overrides) in HALF.items():
    with check(f"half_{name}"):
        start, before, norms, after = half_round(name, lr, scale, **overrides)
        everyone = torch.tensor(gathered(before, f"test.half.x.{name}"), dtype=torch.float64)
        sizes = [8, 2]  # weight, bias
        if name.endswith("grawa"):
            all_norms = torch.tensor(gathered(norms, f"test.half.n.{name}"), dtype=torch.float64)
            if name == "mgrawa":
                inv = 1.0 / all_norms.pow(2).sum(1, keepdim=True).sqrt()
                centre = (everyone * inv).sum(0) / inv.sum()
            else:
                inv = (1.0 / all_norms).repeat_interleave(torch.tensor(sizes), dim=1)
                centre = (everyone * inv).sum(0) / inv.sum(0)
            expected = before - 0.5 * (before - centre)
        elif name == "localsgd":
            expected = everyone.mean(0)
        elif name == "easgd":  # the centre starts as the mean of the initial parameters
            starts = torch.tensor(gathered(start, "test.half.start"), dtype=torch.float64)
            expected = before - (0.9 / size) * (before - starts.mean(0))
        else:  # DiLoCo: every worker started from rank 0's parameters, the outer parameters
            expected = start - 0.7 * (start - everyone.mean(0))
        error = float((after - expected).abs().max())
        value(f"half_{name}", f"max_error={error:.2e} max_abs={float(expected.abs().max()):.3f}")
        assert torch.isfinite(after).all(), after
        assert error <= 2e-3, (after, expected)  # float16's rounding of values below 1

with check("half_lsgd_trains"):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).half()
    opt = build("lsgd2", torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, prox=0.1)
    train(opt, model, [torch.randn(8, 4).half() for _ in range(8)], lambda m, x: m(x).float().pow(2).mean())
    opt.close()
    assert finite_floats(model) and all(p.dtype == torch.float16 for p in model.parameters())


# ---------------------------------------------------------------------------- 4. changed after wrapping
def expect_error(fn, *fragments):
    try:
        fn()
    except (RuntimeError, ValueError) as error:
        message = str(error)
        assert all(f in message for f in fragments), message
        return message
    raise AssertionError(f"no error; expected one mentioning {fragments}")


def one_step(opt, model, x):
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step(loss)


for name in WRAPPERS:
    with check(f"changed_{name}"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3))
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        opt = build(name, sgd, model)
        one_step(opt, model, torch.randn(4, 3))
        model.append(nn.Linear(3, 2))  # a head appended after wrapping, and given to the optimizer
        sgd.add_param_group({"params": model[1].parameters()})
        message = expect_error(lambda: one_step(opt, model, torch.randn(4, 3)), "param groups changed",
                               "build the wrapper once the model and the optimizer are complete")
        opt.close()
    with check(f"changed_model_{name}"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3))
        opt = build(name, torch.optim.SGD(model.parameters(), lr=0.05), model)
        one_step(opt, model, torch.randn(4, 3))
        model.append(nn.Linear(3, 3))  # a layer added to the model only: it would never be exchanged
        expect_error(lambda: one_step(opt, model, torch.randn(4, 3)), "model's parameters changed",
                     "2 parameter tensors then, 4 now")
        opt.close()

with check("changed_requires_grad_dp"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    opt = build("dp", torch.optim.SGD(model.parameters(), lr=0.05), model)
    one_step(opt, model, torch.randn(4, 3))
    model[0].weight.requires_grad_(True)  # unfrozen: Horovod never hooked it
    expect_error(lambda: one_step(opt, model, torch.randn(4, 3)), "requires_grad changed", "'0.weight'")
    opt.close()

with check("changed_requires_grad_followed_lsgd"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    opt = build("lsgd1", torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
    one_step(opt, model, torch.randn(4, 3))
    frozen = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(True)  # unfrozen: the fused step follows it
    one_step(opt, model, torch.randn(4, 3))
    assert float((model[0].weight - frozen).abs().max()) > 0 and opt.fused_steps == 2
    opt.close()


# ---------------------------------------------------------------------------- 5. sparse gradients
class Bag(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def sparse_batches():
    data = torch.Generator().manual_seed(rank)
    return [torch.randint(0, 10, (6, 3), generator=data) for _ in range(4)]


for name in WRAPPERS:
    with check(f"sparse_{name}"):
        torch.manual_seed(0)
        model = Bag(sparse=True)
        opt = build(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
        train(opt, model, sparse_batches(), lambda m, x: m(x).pow(2).mean())
        opt.close()
        assert finite_floats(model)

with check("sparse_dp_equals_dense"):
    finals = []
    for sparse in (True, False):
        torch.manual_seed(0)
        model = Bag(sparse=sparse)
        opt = build("dp", torch.optim.SGD(model.parameters(), lr=0.1), model)
        train(opt, model, sparse_batches(), lambda m, x: m(x).pow(2).mean())
        opt.close()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    everyone = gathered(finals[0], "test.sparse.dp")
    assert all(row == everyone[0] for row in everyone)  # the replicas agree
    assert float((finals[0] - finals[1]).abs().max()) < 1e-6, (finals[0] - finals[1]).abs().max()

with check("sparse_dp_nan_values"):
    torch.manual_seed(0)
    model = Bag(sparse=True)
    opt = build("dp", torch.optim.SGD(model.parameters(), lr=0.1), model)
    loss = model(torch.tensor([[1, 2, 3]])).pow(2).mean() * (math.nan if rank == 2 else 1.0)
    opt.zero_grad()
    loss.backward()
    expect_error(lambda: opt.step(loss), "every worker diverged")
    opt.close()


# ---------------------------------------------------------------------------- 6. broadcasting optimizer state
for name in WRAPPERS:
    with check(f"broadcast_state_fresh_{name}"):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        adamw = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        opt = build(name, adamw, model)
        before = [p.detach().clone() for p in model.parameters()]
        opt.broadcast_optimizer_state(0)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert len(adamw.state) == 0, adamw.state  # no step count, no moments: still fresh
        opt.close()

with check("broadcast_state_from_root"):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.2 if rank == 0 else 0.1, momentum=0.9)
    if rank == 0:  # only the root has stepped: it has momentum buffers
        model(torch.randn(2, 3)).sum().backward()
        sgd.step()
    for p in model.parameters():
        p.grad = None
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = build("lsgd1", sgd, model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.broadcast_optimizer_state(0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sgd.param_groups[0]["lr"] == 0.2
    buffers = torch.cat([sgd.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    everyone = gathered(buffers, "test.bcast.momentum")
    assert all(row == everyone[0] for row in everyone) and any(v != 0 for v in everyone[0])
    one_step(opt, model, torch.randn(2, 3))  # the fused path adopts the received buffers
    opt.close()


# ---------------------------------------------------------------------------- 7. checkpoints across worlds
STATES = {}
for name in ("lsgd2_async", "lsgd2", "easgd_onesided", "localsgd", "mgrawa", "diloco", "easgd"):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = build(name, torch.optim.SGD(model.parameters(), lr=0.05), model)
    data = torch.Generator().manual_seed(rank)
    train(opt, model, [torch.randn(4, 3, generator=data) for _ in range(8)], lambda m, x: m(x).pow(2).mean())
    opt.close()
    STATES[name] = opt.state_dict()

for name in ("lsgd2_async", "lsgd2"):
    with check(f"world_other_groups_{name}"):
        hl.init(group_size=4)  # the same 4 ranks, one group instead of two
        model = nn.Linear(3, 2)
        opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.05), model, period=2, global_period=4,
                      asynchronous=name.endswith("async"))
        expect_error(lambda: opt.load_state_dict(STATES[name]), "another world", "4 ranks in groups [[0, 1], [2, 3]]",
                     "4 ranks in groups [[0, 1, 2, 3]]")
        opt.close()

pairs = MPI.COMM_WORLD.Split(color=rank // 2, key=rank)  # two worlds of 2 ranks
hl.init(comm=pairs)
for name in ("lsgd2_async", "lsgd2", "easgd_onesided"):
    with check(f"world_two_ranks_{name}"):
        model = nn.Linear(3, 2)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        opt = (hl.OneSidedEASGD(sgd, model, period=2) if name == "easgd_onesided"
               else hl.LSGD(sgd, model, period=2, global_period=4, asynchronous=name.endswith("async")))
        expect_error(lambda: opt.load_state_dict(STATES[name]), "another world", "4 ranks", "2 ranks")
        opt.close()
for name in ("localsgd", "mgrawa", "diloco", "easgd"):
    with check(f"world_two_ranks_resumes_{name}"):
        model = nn.Linear(3, 2)
        opt = WRAPPERS[name][1](torch.optim.SGD(model.parameters(), lr=0.05), model)
        opt.load_state_dict(STATES[name])
        assert opt.steps == 8
        train(opt, model, [torch.randn(4, 3) for _ in range(2)], lambda m, x: m(x).pow(2).mean())
        opt.close()
        assert finite_floats(model) and opt.steps == 10
hl.init(group_size=4, comm=MPI.COMM_WORLD)


# ---------------------------------------------------------------------------- 8. settings that disagree
DISAGREE = {  # name -> (argument, rank 0's value, the others')
    "lsgd1": ("period", 2, 3),
    "lsgd2": ("local_pull", 0.1, 0.2),
    "lsgd2_int8": ("compression", "int8", None),
    "lsgd2_async": ("score_window", 4, 8),
    "mgrawa": ("layerwise", False, True),
    "mgrawa_async": ("pull", 0.5, 0.25),
    "easgd": ("beta", 0.9, 0.5),
    "easgd_async": ("asynchronous", True, False),
    "easgd_onesided": ("period", 2, 3),
    "localsgd": ("period", 2, 3),
    "localsgd_int8": ("compression", "int8", "bf16"),
    "diloco": ("outer_lr", 0.7, 0.5),
    "dp": ("backward_passes_per_step", 1, 2),
}
for name, (argument, mine, theirs) in DISAGREE.items():
    with check(f"disagree_{name}"):
        model = nn.Linear(3, 2)
        given = mine if rank == 0 else theirs
        expect_error(lambda: build(name, torch.optim.SGD(model.parameters(), lr=0.05), model, **{argument: given}),
                     f"{argument} differs across ranks", f"ranks [0] have {mine!r}", f"ranks [1, 2, 3] have {theirs!r}")
