"""Every method trains the digits CNN to >= 90% test accuracy on 4 ranks, with one loop."""
import sys

import horovod.torch as hvd
import torch

import horovod_leader as hl
from horovod_leader.training.data import digits, shard
from horovod_leader.training.models import DigitsCNN
from _common import check, evaluated_accuracy, train_steps, value

STEPS = 320
methods = sys.argv[1].split(",") if len(sys.argv) > 1 else ["lsgd", "mgrawa", "lgrawa", "easgd", "localsgd", "dp", "diloco", "lsgd_int8"]
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
    # The paper's pairing: AdamW inside, Nesterov outside (SGD with momentum inside diverges
    # under the paper's outer momentum 0.9).
    "diloco": lambda o, m: hl.DiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-3), m, period=8, outer_lr=0.7,
                                     outer_momentum=0.9),
    "lsgd_int8": lambda o, m: hl.LSGD(o, m, period=4, global_period=16, compression="int8"),
}


for method in methods:
    with check(f"digits_{method}"):
        torch.manual_seed(0)
        model = DigitsCNN()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = make[method](torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
        train_steps(model, opt, mine, rank, STEPS)
        evaluated = evaluated_accuracy(method, opt, model, test)
        value(f"accuracy_{method}", f"{evaluated:.4f}")
        assert evaluated >= 0.90, (method, evaluated)
        opt.close()

hvd.shutdown()
