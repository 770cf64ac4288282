"""Asynchronous rounds keep pace, overlap stays, and a leader is never pulled back (4 ranks).

* schedule_*: at periods 1 and 4, with equal speeds and with rank 3 three times slower, for
  asynchronous LSGD (one and two groups) and GRAWA: at least 90% of the rounds that fall due
  during training start during training, and every round starts at most one round behind the
  global count (``rounds_history``).
* overlap_*: at period 4 with rank 3 three times slower, the fast ranks take at least twice the
  slow rank's steps in the same time (a version that blocks at every round fails this).
* leader_follows_sgd_*: a rank that always has the lowest score follows plain SGD (momentum
  0.9) to 1e-5, synchronously and asynchronously, one and two groups, with ``prox > 0``.
"""
import time

import horovod.torch as hvd
import torch
from torch import nn

import horovod_leader as hl
from _common import check, value

topo = hl.init(group_size=4)
rank, size = topo.rank, topo.size
SLOW = 3


def make(kind: str, model, period: int, **extra):
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    if kind == "lsgd1":
        return hl.LSGD(sgd, model, period=period, global_period=period, asynchronous=True, **extra)
    if kind == "lsgd2":
        return hl.LSGD(sgd, model, period=period, global_period=2 * period, asynchronous=True, **extra)
    return hl.GRAWA(sgd, model, period=period, pull=0.5, asynchronous=True, **extra)


def run(kind: str, period: int, slow: bool, steps: int = None, seconds: float = None, pause: float = 0.002):
    """Train a small model asynchronously; returns (steps, total seen at close, opt)."""
    hl.init(group_size=2 if kind == "lsgd2" else 4)
    torch.manual_seed(rank)
    model = nn.Linear(16, 4)
    opt = make(kind, model, period)
    delay = pause * (3 if slow and rank == SLOW else 1)
    deadline = None if seconds is None else time.perf_counter() + seconds
    taken = 0
    while (steps is None or taken < steps) and (deadline is None or time.perf_counter() < deadline):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        time.sleep(delay)
        opt.step(loss)
        taken += 1
    total_at_close = opt._schedule.last_total
    opt.close()
    return taken, total_at_close, opt


for period in (1, 4):
    for kind in ("lsgd1", "lsgd2", "grawa"):
        for slow in (False, True):
            name = f"schedule_{kind}_p{period}_{'straggler' if slow else 'equal'}"
            with check(name):
                taken, total_at_close, opt = run(kind, period, slow, steps=48 if period == 1 else 64)
                unit = opt._schedule.unit
                history = opt.rounds_history
                during = opt._schedule.started_during_training
                due = total_at_close // unit
                lag = max((total // unit - n for n, total, _ in history), default=0)
                value(name, f"due={due} started_during_training={during} worst_lag={lag} waits={opt._schedule.waits}")
                assert during >= 0.9 * due, (name, during, due)
                assert lag <= 1, (name, history)
                # every rank joined every round once, in order
                assert [n for n, _, _ in history] == list(range(1, len(history) + 1))

for kind in ("lsgd1", "grawa"):
    with check(f"overlap_{kind}"):
        taken, _, opt = run(kind, 4, slow=True, seconds=3.0, pause=0.01)
        steps = hvd.allgather(torch.tensor([taken]), name=f"test.overlap.{kind}").tolist()
        value(f"overlap_steps_{kind}", steps)
        assert min(steps[:SLOW]) >= 2 * steps[SLOW], steps


def leader_follows_sgd(asynchronous: bool, groups: int, steps: int = 40):
    """Rank 0 reports the lowest score at every step; compare it with plain SGD on the same batches."""
    hl.init(group_size=size // groups)
    torch.manual_seed(100 + rank)  # different starting points: the others really are pulled
    model = nn.Linear(6, 2)
    reference = nn.Linear(6, 2)
    reference.load_state_dict(model.state_dict())
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, period=2,
                  global_period=2 * groups, local_pull=0.3, global_pull=0.3, prox=0.2, score_window=1,
                  asynchronous=asynchronous)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(7 + rank)
    worst = 0.0
    for step in range(steps):
        x, y = torch.randn(8, 6, generator=data), torch.randn(8, 2, generator=data)
        for m, o in ((model, None), (reference, ref_opt)):
            loss = nn.functional.mse_loss(m(x), y)
            m.zero_grad()
            loss.backward()
            if o is None:
                opt.step(0.0 if rank == 0 else 1.0 + rank)  # rank 0 always has the lowest score
            else:
                o.step()
        if rank == 0:
            worst = max(worst, max(float((p - q).abs().max()) for p, q in zip(model.parameters(),
                                                                             reference.parameters())))
        elif asynchronous:
            time.sleep(0.002 * rank)  # uneven speeds: rounds really are asynchronous
    opt.close()
    pulled = hvd.allgather(torch.tensor([float((model.weight - reference.weight).detach().abs().max())]),
                           name=f"test.pulled.{asynchronous}.{groups}").tolist()
    return worst, pulled, opt


for asynchronous in (False, True):
    for groups in (1, 2):
        name = f"leader_follows_sgd_{'async' if asynchronous else 'sync'}_{groups}group"
        with check(name):
            worst, pulled, opt = leader_follows_sgd(asynchronous, groups)
            value(name, f"leader_deviation={worst:.2e} others_moved={[round(p, 4) for p in pulled]}")
            if rank == 0:
                assert worst <= 1e-5, worst
            assert opt.global_leader == 0, opt.global_leader
            # the others were pulled (so the test can fail): they left their plain-SGD paths
            assert min(pulled[1:]) > 1e-3, pulled

hvd.shutdown()
