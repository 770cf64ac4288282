"""Train a small CNN on the bundled digits data with Leader SGD: the library API in one loop.

    mpirun -np 4 python examples/lsgd_digits.py --group-size 2
    horovodrun -np 4 python examples/lsgd_digits.py
"""
import argparse

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import horovod_leader as hl
from horovod_leader.training.data import digits, shard
from horovod_leader.training.models import DigitsCNN

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--group-size", type=int, default=None, help="ranks per group (default: ranks per node)")
parser.add_argument("--epochs", type=int, default=25)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--period", type=int, default=4, help="local refresh period tau")
parser.add_argument("--global-period", type=int, default=16, help="global refresh period tau_G")
parser.add_argument("--local-pull", type=float, default=0.1)
parser.add_argument("--global-pull", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

topo = hl.init(group_size=args.group_size)
torch.manual_seed(args.seed)
if topo.rank == 0:
    print(f"LSGD on digits: {topo.describe()}", flush=True)

train, test = digits(seed=args.seed)
loader = torch.utils.data.DataLoader(shard(train, topo.rank, topo.size), batch_size=args.batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(args.seed + topo.rank))
model = DigitsCNN()
hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # every worker starts from rank 0's weights
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
opt = hl.LSGD(optimizer, model, period=args.period, global_period=args.global_period,
              local_pull=args.local_pull, global_pull=args.global_pull)

for epoch in range(1, args.epochs + 1):
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        opt.step(loss)
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean()
    accuracies = hvd.allgather(accuracy.reshape(1), name="example.accuracy").tolist()
    if topo.rank == 0:
        leader = opt.global_leader  # None until the first global refresh
        lead = "no global refresh yet" if leader is None else f"global leader rank {leader} at {accuracies[leader]:.4f}"
        print(f"epoch {epoch}: {lead}, workers {[round(a, 3) for a in accuracies]}, "
              f"comm {opt.comm_bytes / 1e6:.2f} MB", flush=True)
opt.close()
