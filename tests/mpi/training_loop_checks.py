"""A user's training loop on 4 ranks: uneven step counts, DataParallel's habits.

* uneven_*: ranks take 40, 40, 40 and 30 steps (synchronous), then close: every rank
  finishes, under LSGD (one and two groups), GRAWA, EASGD, LocalSGD, DataParallel, DiLoCo,
  and compressed LSGD, GRAWA, EASGD and LocalSGD. Under
  LocalSGD the final parameters equal the average over the ranks still stepping at the last
  round (computed here directly).
* dp_clip_skip_synchronize: synchronize, clip the averaged gradient, step inside
  skip_synchronize: the replicas stay identical, and the user's optimizer holds momentum.
* dp_uneven_average: once a rank has closed, DataParallel's average is over all ranks, the
  closed one counting as zeros (Horovod's join).
* fused_*: the fused LSGD path runs the optimizer's step hooks, keeps LR schedulers quiet,
  covers per-group weight decay and frozen parameters, and matches the unfused path there.
* errors_and_inputs: bfloat16 models, foreign state dicts and numpy integers.
"""
import warnings

import numpy as np
import pytest
import horovod.torch as hvd
import torch
from torch import nn

import horovod_leader as hl
from _common import check, value

topo = hl.init(group_size=4)
rank, size = topo.rank, topo.size
STEPS = [40, 40, 40, 30]

MAKERS = {
    "lsgd1": (4, lambda o, m: hl.LSGD(o, m, period=4, global_period=4)),
    "lsgd2": (2, lambda o, m: hl.LSGD(o, m, period=2, global_period=4)),
    "grawa": (4, lambda o, m: hl.GRAWA(o, m, period=4)),
    "easgd": (4, lambda o, m: hl.EASGD(o, m, period=4)),
    "localsgd": (4, lambda o, m: hl.LocalSGD(o, m, period=4)),
    "dp": (4, lambda o, m: hl.DataParallel(o, m)),
    "diloco": (4, lambda o, m: hl.DiLoCo(o, m, period=4)),
    # compressed rounds post other collectives (all-gathers, payload broadcasts): closed ranks must match them
    "lsgd2_int8": (2, lambda o, m: hl.LSGD(o, m, period=2, global_period=4, compression="int8")),
    "grawa_bf16": (4, lambda o, m: hl.GRAWA(o, m, period=4, compression="bf16")),
    "easgd_int8": (4, lambda o, m: hl.EASGD(o, m, period=4, compression="int8")),
    "localsgd_int8": (4, lambda o, m: hl.LocalSGD(o, m, period=4, compression="int8")),
}


def gather(t: torch.Tensor, name: str) -> torch.Tensor:
    return hvd.allgather(t.detach().reshape(1, -1), name=name)


for name, (group_size, make) in MAKERS.items():
    with check(f"uneven_{name}"):
        hl.init(group_size=group_size)
        torch.manual_seed(rank)
        model = nn.Linear(6, 2)
        opt = make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
        data = torch.Generator().manual_seed(rank)
        before_last_round = None
        for step in range(1, STEPS[rank] + 1):
            x, y = torch.randn(8, 6, generator=data), torch.randn(8, 2, generator=data)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step(loss)
        with opt:  # leaving the block closes; the rank that stopped early keeps joining
            pass
        assert opt.steps == STEPS[rank]
        finished = hvd.allgather(torch.tensor([opt.steps]), name=f"test.uneven.{name}").tolist()
        assert finished == STEPS, finished
        if name == "localsgd":
            # Rounds at steps 4, 8, ..., 40: the last ones only had ranks 0-2 stepping (the exact
            # average is checked below), so they agree and rank 3 does not.
            final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            everyone = gather(final, "test.localsgd.final")
            assert torch.equal(everyone[0], everyone[1]) and torch.equal(everyone[1], everyone[2])
            assert not torch.equal(everyone[0], everyone[3])  # rank 3 closed before the last round
            value("localsgd_final_spread", float((everyone[:3] - everyone[0]).abs().max()))


with check("localsgd_uneven_average_is_over_stepping_ranks"):
    # The same check made exact: parameters that the optimizer does not move (lr 0), set per
    # rank, and a rank that closes before the last round.
    hl.init(group_size=4)
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(float(rank + 1))
    opt = hl.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.0), model, period=2)
    for step in range(1, (4 if rank == 3 else 6) + 1):  # rounds at 2, 4 (all ranks) and 6 (ranks 0-2)
        model.weight.grad = torch.zeros_like(model.weight)
        if step == 5:
            with torch.no_grad():
                model.weight.fill_(10.0 * (rank + 1))  # ranks 0-2 move to 10, 20, 30 before round 3
        opt.step(0.0)
    opt.close()
    if rank < 3:
        assert torch.allclose(model.weight, torch.full((1, 3), 20.0)), model.weight  # mean of 10, 20, 30
    else:
        assert torch.allclose(model.weight, torch.full((1, 3), 2.5)), model.weight  # the round at step 4

with check("dp_clip_skip_synchronize"):
    hl.init(group_size=4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt = hl.DataParallel(sgd, model)
    data = torch.Generator().manual_seed(rank)
    for step in range(20):
        x, y = torch.randn(8, 6, generator=data) * (1 + 5 * rank), torch.randn(8, 2, generator=data)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # clipping really bites at this scale
        with opt.skip_synchronize():
            opt.step(loss)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = gather(flat, "test.dp.replicas")
    assert all(torch.equal(everyone[0], everyone[r]) for r in range(size)), (everyone - everyone[0]).abs().max()
    assert all("momentum_buffer" in sgd.state[p] for p in model.parameters())  # the user's optimizer holds it
    assert opt.state_dict()["optimizer"]["state"], "momentum missing from state_dict"

with check("dp_uneven_average"):
    hl.init(group_size=4)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    opt = hl.DataParallel(torch.optim.SGD(model.parameters(), lr=1.0), model)
    for step in range(2 if rank == 3 else 3):
        loss = (model(torch.ones(1, 1)) - 1.0).sum() * 0 + model.weight.sum()  # gradient 1 on every rank
        opt.zero_grad()
        loss.backward()
        opt.step(loss)
    with opt:
        pass
    # Steps 1-2: the average of four 1s is 1; step 3: three ranks step, rank 3 has joined.
    third_step = -float(model.weight) - 2.0
    value("dp_uneven_average_of_ones", f"{third_step:.4f}")
    if rank < 3:
        assert abs(third_step - 0.75) < 1e-6, third_step  # Horovod's join: zeros from the closed rank



def lsgd_run(fused, make_groups, freeze=False, steps=12, hooks=None):
    hl.init(group_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * rank)
    if freeze:
        model[0].weight.requires_grad_(False)
    sgd = torch.optim.SGD(make_groups(model), lr=0.1, momentum=0.9, nesterov=True)
    opt = hl.LSGD(sgd, model, period=2, global_period=4, prox=0.1, fused=fused)
    if hooks is not None:
        sgd.register_step_pre_hook(lambda *a: hooks.append("pre"))
        sgd.register_step_post_hook(lambda *a: hooks.append("post"))
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=5, gamma=0.5)
    data = torch.Generator().manual_seed(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, y = torch.randn(8, 6, generator=data), torch.randn(8, 2, generator=data)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step(loss)
            scheduler.step()
    return model, opt, [str(w.message) for w in caught]


def no_decay_on_biases(model):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.requires_grad]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": 1e-2}, {"params": biases, "weight_decay": 0.0}]


with check("fused_step_hooks_and_scheduler"):
    hooks = []
    model, opt, messages = lsgd_run(None, lambda m: m.parameters(), hooks=hooks)
    assert opt.fused_steps == 12 and hooks == ["pre", "post"] * 12, (opt.fused_steps, hooks)
    assert not any("lr_scheduler.step()" in m for m in messages), messages

with check("fused_per_group_weight_decay_and_frozen"):
    for freeze in (False, True):
        groups = no_decay_on_biases
        model_f, opt_f, _ = lsgd_run(None, groups, freeze=freeze)
        model_u, opt_u, _ = lsgd_run(False, groups, freeze=freeze)
        assert opt_f.fused_steps == 12 and opt_u.fused_steps == 0
        for (name, a), b in zip(model_f.named_parameters(), model_u.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (freeze, name, (a - b).abs().max())

with check("errors_and_inputs"):
    hl.init(group_size=4)
    model = nn.Linear(3, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match="'weight' is bfloat16"):
        hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model = nn.Linear(3, 2)
    opt = hl.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, period=np.int64(4))
    assert opt.period == 4 and type(opt.period) is int
    with pytest.raises(ValueError, match="optimizer's state_dict"):
        opt.load_state_dict(opt.optimizer.state_dict())
    with pytest.raises(ValueError, match="state_dict is from LSGD"):
        opt.load_state_dict({"algorithm": "LSGD"})
    with pytest.raises(ValueError, match="expects the dict"):
        opt.load_state_dict([1, 2])
    opt.broadcast_optimizer_state(root_rank=0)
    # Nothing above left a rank in a collective: all are still in step.
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.alive.loop").item() == size

hvd.shutdown()
