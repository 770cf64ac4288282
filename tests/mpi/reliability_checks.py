"""Faults under 4 ranks: mismatched models are refused everywhere; a worker whose parameters
turn NaN is never a leader or part of a centre, is reset, and training still reaches 90%."""
import horovod.torch as hvd
import pytest
import torch
from torch import nn

import horovod_leader as hl
from horovod_leader.training.data import digits, shard
from horovod_leader.training.models import DigitsCNN
from _common import check, evaluated_accuracy, train_steps, value

topo = hl.init(group_size=2)
rank, size = topo.rank, topo.size


def alive():
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.alive").item() == size


with check("mismatched_models"):
    for odd in (lambda: nn.Linear(4, 2), lambda: nn.Linear(3, 2).double(), lambda: nn.Sequential(nn.Linear(3, 2))):
        model = odd() if rank == 3 else nn.Linear(3, 2)
        for cls in (hl.LSGD, hl.GRAWA, hl.EASGD, hl.LocalSGD, hl.DataParallel):
            with pytest.raises(ValueError, match=r"model differs across ranks: ranks \[3\]"):
                cls(torch.optim.SGD(model.parameters(), lr=0.1), model)
    alive()  # nobody was left inside a collective

train, test = digits()
mine = shard(train, rank, size)
methods = {
    "lsgd": lambda o, m: hl.LSGD(o, m, period=4, global_period=16),
    "grawa": lambda o, m: hl.GRAWA(o, m, period=32, pull=0.5),
    "easgd": lambda o, m: hl.EASGD(o, m, period=4, beta=0.9),
    "localsgd": lambda o, m: hl.LocalSGD(o, m, period=4),
}
for name, make in methods.items():
    with check(f"nan_recovery_{name}"):
        torch.manual_seed(0)
        model = DigitsCNN()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
        leaders_after_fault = set()

        def fault(step):
            if step == 100 and rank == 1:
                with torch.no_grad():  # the fault: this worker's parameters blow up
                    for p in model.parameters():
                        p.fill_(float("nan"))
            if name == "lsgd" and 100 <= step < 104:
                leaders_after_fault.add(opt.local_leader)

        train_steps(model, opt, mine, rank, 320, on_step=fault)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if rank == 1:
            assert opt.recoveries == 1, opt.recoveries
        if name == "lsgd":
            assert 1 not in leaders_after_fault  # the diverged worker never led
        accuracy = evaluated_accuracy(name, opt, model, test)
        value(f"nan_recovery_accuracy_{name}", f"{accuracy:.4f}")
        assert accuracy >= 0.90, (name, accuracy)

hvd.shutdown()
