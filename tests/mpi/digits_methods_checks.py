"""Every method trains the digits CNN to >= 90% test accuracy on 4 ranks, with one loop."""
import sys

import horovod.torch as hvd
import torch
from torch import nn

import horovod_leader as hl
from horovod_leader.data import digits, shard
from horovod_leader.models import DigitsCNN
from _common import check, value

STEPS = 320
methods = sys.argv[1].split(",") if len(sys.argv) > 1 else ["lsgd", "mgrawa", "lgrawa", "easgd", "localsgd", "dp"]
topo = hl.init(group_size=2)
rank, size = topo.rank, topo.size
train, test = digits()
mine = shard(train, rank, size)

make = {
    "lsgd": lambda o, m: hl.LSGD(o, m, period=4, global_period=16),
    "mgrawa": lambda o, m: hl.GRAWA(o, m, period=32, pull=0.5),
    "lgrawa": lambda o, m: hl.GRAWA(o, m, period=32, pull=0.5, layerwise=True),
    "easgd": lambda o, m: hl.EASGD(o, m, period=4, beta=0.9),
    "localsgd": lambda o, m: hl.LocalSGD(o, m, period=4),
    "dp": lambda o, m: hl.DataParallel(o, m),
}


def accuracy(model) -> float:
    with torch.no_grad():
        x, y = test.tensors
        return float((model(x).argmax(1) == y).float().mean())


for method in methods:
    with check(f"digits_{method}"):
        torch.manual_seed(0)
        model = DigitsCNN()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = make[method](torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
        loader = torch.utils.data.DataLoader(mine, batch_size=32, shuffle=True,
                                             generator=torch.Generator().manual_seed(rank))
        steps = 0
        while steps < STEPS:
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step(loss)
                steps += 1
                if steps == STEPS:
                    break
        # What the papers evaluate: LSGD's global leader, EASGD's centre, otherwise the workers' average.
        if method == "lsgd":
            evaluated = hvd.allgather(torch.tensor([accuracy(model)]), name=f"test.{method}").tolist()[opt.global_leader]
        else:
            if method == "easgd":
                for flat, centre in zip(opt.params.values(), opt.centre.values()):
                    flat.flat.copy_(centre)
            else:
                for flat in opt.params.values():
                    hvd.allreduce_(flat.flat, op=hvd.Average, name=f"test.avg.{method}")
            evaluated = accuracy(model)
        value(f"accuracy_{method}", f"{evaluated:.4f}")
        assert evaluated >= 0.90, (method, evaluated)
        opt.close()

hvd.shutdown()
