"""LSGD under 4 ranks: exact pull arithmetic, election rules, communication volume,
fused against unfused trajectories, a non-SGD optimizer, and state_dict round trips."""
import copy
import math

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import horovod_leader as hl
from _common import check

topo = hl.init(group_size=2)
rank, size = topo.rank, topo.size


def linear_with_weight(value: float, n: int = 3) -> nn.Module:
    model = nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def one_step(model, opt, loss_value: float) -> None:
    """A backward pass (so grads exist and the fused path runs), then step with a given loss."""
    model.zero_grad()
    model(torch.ones(1, model.in_features)).sum().backward()
    opt.step(loss_value)


for fused in (None, False):
    tag = "fused" if fused is None else "unfused"
    with check(f"exact_pull_two_groups_{tag}"):
        hl.init(group_size=2)
        model = linear_with_weight(rank + 1)
        opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, global_period=1,
                      local_pull=0.25, global_pull=0.5, score_window=1, fused=fused)
        one_step(model, opt, [4.0, 3.0, 2.0, 1.0][rank])
        assert opt.local_leader == (1 if rank < 2 else 3), opt.local_leader
        assert opt.global_leader == 3
        expected = [2.75, 3.0, 3.75, 4.0][rank]
        assert model.weight.tolist() == [[expected] * 3], (model.weight.tolist(), expected)
        assert (opt.fused_steps == 1) == (fused is None)

    with check(f"exact_pull_one_group_{tag}"):
        hl.init(group_size=4)
        model = linear_with_weight(rank + 1)
        opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, global_period=1,
                      local_pull=0.25, global_pull=0.5, score_window=1, fused=fused)
        one_step(model, opt, [4.0, 3.0, 2.0, 1.0][rank])
        assert opt.global_leader == 3 and opt.local_leader == 3
        expected = [2.5, 3.0, 3.5, 4.0][rank]
        assert model.weight.tolist() == [[expected] * 3], (model.weight.tolist(), expected)

hl.init(group_size=2)

with check("election_running_mean"):
    # The last losses favour rank 2; the mean of the window favours rank 0.
    losses = {0: [1.0, 1.0, 1.0], 1: [0.1, 0.1, 5.0], 2: [5.0, 5.0, 0.5], 3: [2.0, 2.0, 2.0]}[rank]
    model = linear_with_weight(rank + 1)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=3, global_period=3,
                  local_pull=0.0, global_pull=0.0, score_window=3)
    for step, loss in enumerate(losses, 1):
        one_step(model, opt, torch.tensor(loss))
        if step < 3:
            assert opt.global_leader is None  # no refresh yet
    assert opt.global_leader == 0, opt.global_leader
    assert opt.local_leader == (0 if rank < 2 else 3), opt.local_leader  # group {2,3}: means 3.5 vs 2.0

with check("election_nan_inf_ties"):
    # NaN and -inf never win; ranks 2 and 3 tie and the lower rank wins; all ranks agree.
    loss = [math.nan, -math.inf, 3.0, 3.0][rank]
    model = linear_with_weight(rank + 1)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, global_period=1,
                  local_pull=0.5, global_pull=0.5, score_window=1)
    one_step(model, opt, loss)
    assert opt.global_leader == 2, opt.global_leader
    none_as = lambda leader: -1 if leader is None else leader
    leaders = hvd.allgather(torch.tensor([[none_as(opt.global_leader), none_as(opt.local_leader)]]), name="test.leaders").tolist()
    assert [row[0] for row in leaders] == [2, 2, 2, 2]
    # Group {0,1} has no finite score: no local leader was elected there.
    assert [row[1] for row in leaders] == [-1, -1, 2, 2], leaders
    if rank in (0, 1):
        # Non-finite workers are reset to the global leader's parameters.
        assert opt.recoveries == 1 and model.weight.tolist() == [[3.0] * 3], model.weight.tolist()

with check("election_all_ranks_agree"):
    torch.manual_seed(100 + rank)
    model = linear_with_weight(rank + 1)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, global_period=2,
                  local_pull=0.0, global_pull=0.0, score_window=2)
    for _ in range(6):
        one_step(model, opt, float(torch.rand(())))
        both = hvd.allgather(torch.tensor([[opt.global_leader or -1, opt.local_leader]]), name="test.agree").tolist()
        assert len({row[0] for row in both}) == 1
        assert both[0][1] == both[1][1] and both[2][1] == both[3][1]

with check("comm_bytes"):
    hl.init(group_size=4)
    model = nn.Sequential(nn.Linear(50, 20), nn.Tanh(), nn.Linear(20, 3))
    payload = sum(p.numel() * 4 for p in model.parameters())
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.01), model, period=4, global_period=4,
                  local_pull=0.1, global_pull=0.1)
    start = opt.comm_bytes
    for step in range(1, 13):
        model.zero_grad()
        loss = model(torch.randn(8, 50)).pow(2).mean()
        loss.backward()
        opt.step(loss)
    # 3 refreshes, each: the leader's parameters (P bytes) plus a 32-byte row (score and the
    # round's announcement); not 4 x P.
    assert opt.comm_bytes - start == 3 * (payload + 32), (opt.comm_bytes - start, payload)

    hl.init(group_size=2)
    model = nn.Sequential(nn.Linear(50, 20), nn.Tanh(), nn.Linear(20, 3))
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.01), model, period=2, global_period=4)
    start = opt.comm_bytes
    for step in range(1, 9):
        model.zero_grad()
        loss = model(torch.randn(8, 50)).pow(2).mean()
        loss.backward()
        opt.step(loss)
    # 4 local refreshes (P each), 2 global ones (P each), 4 score exchanges (32-byte rows).
    assert opt.comm_bytes - start == 6 * payload + 4 * 32, (opt.comm_bytes - start, payload)

with check("only_leader_parameters_travel"):
    # With a pull of 1 every worker becomes exactly the leader: what arrived is the leader's x.
    hl.init(group_size=4)
    model = linear_with_weight(10.0 * (rank + 1), n=5)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1, global_period=1,
                  global_pull=1.0, score_window=1)
    one_step(model, opt, [3.0, 1.0, 2.0, 4.0][rank])
    assert opt.global_leader == 1 and model.weight.tolist() == [[20.0] * 5]


def train(fused, optimizer_fn, steps=24, group_size=2, prox=0.1):
    hl.init(group_size=group_size)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():  # different starting points per rank
        for p in model.parameters():
            p.add_(0.1 * rank)
    opt = hl.LSGD(optimizer_fn(model.parameters()), model, period=2, global_period=4, local_pull=0.2,
                  global_pull=0.3, prox=prox, fused=fused)
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        x, y = torch.randn(16, 10, generator=gen), torch.randint(0, 2, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss)
    return model, opt


sgd = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)

with check("fused_matches_unfused"):
    model_f, opt_f = train(None, sgd)
    model_u, opt_u = train(False, sgd)
    assert opt_f.fused_steps == 24 and opt_u.fused_steps == 0
    for (name, a), b in zip(model_f.state_dict().items(), model_u.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name

with check("plain_sgd_momentum_fused"):
    plain = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, dampening=0.1)
    model_f, _ = train(None, plain, prox=0.0)
    model_u, _ = train(False, plain, prox=0.0)
    for a, b in zip(model_f.parameters(), model_u.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)

with check("adam_wrapped"):
    model, opt = train(None, lambda params: torch.optim.Adam(params, lr=1e-3))
    assert opt.fused_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.global_leader is not None

with check("state_dict_round_trip"):
    model, opt = train(None, sgd, steps=10)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds references, as in torch
    # Continue the original, and a fresh copy restored from the checkpoint, for 6 more steps.
    hl.init(group_size=2)
    twin = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    twin_opt = hl.LSGD(sgd(twin.parameters()), twin, period=2, global_period=4, local_pull=0.2, global_pull=0.3,
                       prox=0.1)
    twin.load_state_dict(saved_model)
    twin_opt.load_state_dict(saved_opt)
    assert twin_opt.steps == 10 and twin_opt.global_leader == opt.global_leader
    gen = torch.Generator().manual_seed(7 + rank)
    batches = [(torch.randn(16, 10, generator=gen), torch.randint(0, 2, (16,), generator=gen)) for _ in range(6)]
    for m, o in ((model, opt), (twin, twin_opt)):
        for x, y in batches:
            loss = nn.functional.cross_entropy(m(x), y)
            o.zero_grad()
            loss.backward()
            o.step(loss)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)

with check("bad_arguments"):
    model = linear_with_weight(1.0)
    sgd0 = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, name in [({"period": 0}, "period"), ({"period": 2.5}, "period"),
                         ({"period": 4, "global_period": 6}, "global_period"), ({"local_pull": 1.5}, "local_pull"),
                         ({"global_pull": -0.1}, "global_pull"), ({"prox": 2}, "prox"),
                         ({"score_window": 0}, "score_window")]:
        with pytest.raises(ValueError, match=name):
            hl.LSGD(sgd0, model, **kwargs)
    with pytest.raises(ValueError, match="loss"):
        hl.LSGD(sgd0, model).step(torch.ones(3))
    # Nothing above entered a collective: the ranks are still in step.
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.alive").item() == 4.0

hvd.shutdown()
