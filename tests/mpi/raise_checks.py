"""One rank raises in the middle of training, inside ``with opt:`` or outside it.

    raise_checks.py ALGO WHERE      ALGO in lsgd, localsgd; WHERE in inside, outside

Rank 2 raises at its 5th step; the others would go on for 400 steps. The test expects the
whole job to end, non-zero, promptly: no rank left waiting, none training on alone.
"""
import sys

import torch
from torch import nn

import horovod_leader as hl

algo, where = sys.argv[1], sys.argv[2]
topo = hl.init(group_size=2)
torch.manual_seed(topo.rank)
model = nn.Linear(6, 2)
sgd = torch.optim.SGD(model.parameters(), lr=0.01)
opt = hl.LSGD(sgd, model, period=2, global_period=4) if algo == "lsgd" else hl.LocalSGD(sgd, model, period=2)


def train():
    for step in range(1, 401):
        loss = model(torch.randn(8, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if topo.rank == 2 and step == 5:
            raise RuntimeError(f"user code failed on rank 2 at step {step}")
        opt.step(loss)


if where == "inside":
    with opt:
        train()
else:
    train()
    opt.close()
print(f"rank {topo.rank} finished all its steps", flush=True)  # must not happen on every rank
