"""Asynchronous LSGD, GRAWA and EASGD under 4 ranks with rank 3 three times slower.

Checks: fast workers take more steps between refreshes (counts, not times); refreshes start
at the scheduled global step totals on every rank and none is lost at shutdown; the leader's
broadcast reaches every rank; a time-budget stop with unequal step counts closes cleanly;
asynchronous LSGD, GRAWA and EASGD still train the digits CNN to >= 90%.
"""
import time

import horovod.torch as hvd
import torch
from torch import nn

import horovod_leader as hl
from horovod_leader.training.data import digits, shard
from horovod_leader.training.models import DigitsCNN
from _common import check, evaluated_accuracy, train_steps, value

topo = hl.init(group_size=4)
rank, size = topo.rank, topo.size
SLOW = 3
pause = lambda base: time.sleep(base * (SLOW if rank == SLOW else 1))


def gather_ints(values, name):
    return hvd.allgather(torch.tensor([values], dtype=torch.int64), name=name).tolist()


with check("fast_workers_run_ahead"):
    torch.manual_seed(rank)
    model = nn.Linear(8, 1)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.01), model, period=4, global_period=4,
                  global_pull=0.5, score_window=4, asynchronous=True)
    deadline = time.time() + 4.0  # a time budget: ranks stop at different step counts
    while time.time() < deadline:
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss)
        pause(0.01)
    steps = opt.steps
    opt.close()  # returns once every rank has closed, after the last due refresh
    history = opt.rounds_history
    unit = size * 4
    everyone = gather_ints([steps, len(history)], "test.steps")
    all_steps = [row[0] for row in everyone]
    value("async_steps", all_steps)
    # Fast ranks took more steps than the slow one (it sleeps 3x longer per step) ...
    assert min(all_steps[:SLOW]) >= 1.8 * all_steps[SLOW], all_steps
    # ... and so, between consecutive refreshes, more local steps.
    between = [b[2] - a[2] for a, b in zip(history, history[1:])]
    mean_between = sum(between) / max(len(between), 1)
    means = hvd.allgather(torch.tensor([mean_between]), name="test.between").tolist()
    value("async_steps_between_refreshes", [round(m, 2) for m in means])
    assert min(means[:SLOW]) > 1.5 * means[SLOW], means

with check("refreshes_at_scheduled_totals"):
    total = sum(all_steps)
    # Every rank joined every round 1..R, R = total // unit: none lost at shutdown.
    assert [row[1] for row in everyone] == [total // unit] * size, (everyone, total)
    assert [r[0] for r in history] == list(range(1, total // unit + 1))
    # Round n starts only once the global total has reached n * unit.
    assert all(started_total >= n * unit for n, started_total, _ in history), history
    # The last leader broadcast reached every rank: identical global copies everywhere.
    copy_sum = sum(float(t.double().sum()) for t in opt._copies["global"].values())
    sums = hvd.allgather(torch.tensor([copy_sum], dtype=torch.float64), name="test.copies").tolist()
    assert len(set(sums)) == 1, sums

with check("clean_shutdown_multi_group"):
    hl.init(group_size=2)
    model = nn.Linear(8, 1)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.01), model, period=2, global_period=4,
                  asynchronous=True)
    for _ in range(40 if rank == 0 else 25 + 3 * rank):  # unequal step counts on purpose
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss)
    with opt:  # leaving the block closes
        pass
    rounds = gather_ints([len(opt.rounds_history)], "test.rounds")
    assert len({r[0] for r in rounds}) == 1 and rounds[0][0] == (40 + 28 + 31 + 34) // (4 * 2), rounds

train, test = digits()
mine = shard(train, rank, size)
for name, make in [
    ("lsgd", lambda o, m: hl.LSGD(o, m, period=4, global_period=16, asynchronous=True)),
    ("grawa", lambda o, m: hl.GRAWA(o, m, period=32, pull=0.5, asynchronous=True)),
    ("easgd", lambda o, m: hl.EASGD(o, m, period=4, beta=0.9, asynchronous=True)),
]:
    with check(f"async_digits_{name}"):
        hl.init(group_size=2)
        torch.manual_seed(0)
        model = DigitsCNN()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
        train_steps(model, opt, mine, rank, 320, on_step=lambda step: pause(0.002))
        opt.close()
        accuracy = evaluated_accuracy(name, opt, model, test)
        value(f"async_accuracy_{name}", f"{accuracy:.4f}")
        assert accuracy >= 0.90, (name, accuracy)

hvd.shutdown()
