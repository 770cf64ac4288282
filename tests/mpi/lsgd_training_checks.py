"""LSGD training under 4 ranks: the symmetry trap, and the digits CNN reaching >= 95%."""
import horovod.torch as hvd
import torch
from torch import nn

import horovod_leader as hl
from horovod_leader.training.data import digits, shard
from horovod_leader.training.models import DigitsCNN
from _common import check, test_accuracy, train_steps, value

topo = hl.init(group_size=4)
rank = topo.rank


class Quartic(nn.Module):
    """f(x) = sum_k (x_k^2 - 1)^2: minima at every x in {-1, 1}^8, a maximum f = 8 at x = 0."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(start.clone())

    def forward(self) -> torch.Tensor:
        return ((self.x ** 2 - 1) ** 2).sum()


with check("symmetry_trap"):
    # Mirrored starts: ranks 2 and 3 are the negatives of ranks 0 and 1, so the workers'
    # average is exactly x = 0. Full-batch gradient descent, lr 0.02, period 4, 200 steps.
    base = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    start = base[rank % 2] * (1 if rank < 2 else -1)
    finals = {}
    for pull in (0.0, 0.1):
        model = Quartic(start)
        opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.02), model, period=4, global_period=4,
                      global_pull=pull)
        for _ in range(200):
            loss = model()
            opt.zero_grad()
            loss.backward()
            opt.step(loss)
        finals[pull] = hvd.allgather(model.x.detach()[None], name=f"test.sym.{pull}")
    f = lambda x: float(((x ** 2 - 1) ** 2).sum())
    # Without the leader force the workers sit in different minima around the centre x = 0 ...
    assert f(finals[0.0].mean(0)) > 7.9 and (finals[0.0] - finals[0.0][0]).abs().max() > 1.0
    # ... with it, every worker ends in the same minimum.
    lsgd = finals[0.1]
    assert max(f(x) for x in lsgd) < 1e-6, [f(x) for x in lsgd]
    assert (lsgd - lsgd[0]).abs().max() < 1e-3
    assert torch.allclose(lsgd[0].abs(), torch.ones(8), atol=1e-3)
    value("symmetry_trap_f", [round(f(x), 8) for x in lsgd])

with check("digits_convergence"):
    hl.init(group_size=2)  # the multi-leader setting: two groups of two
    torch.manual_seed(0)
    train, test = digits()
    mine = shard(train, rank, 4)
    model = DigitsCNN()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, period=4, global_period=16,
                  local_pull=0.1, global_pull=0.1)
    train_steps(model, opt, mine, rank, 320)
    accuracies = hvd.allgather(torch.tensor([test_accuracy(model, test)]), name="test.acc").tolist()
    leader = opt.global_leader
    value("digits_leader_accuracy", f"{accuracies[leader]:.4f} leader={leader} all={accuracies}")
    assert accuracies[leader] >= 0.95, accuracies

hvd.shutdown()
