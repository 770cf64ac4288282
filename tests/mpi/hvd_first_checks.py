"""Horovod initialised by the program first, as every Horovod user does (4 ranks).

    hvd_first_checks.py then_init     hvd.init(), then hl.init(group_size=2)
    hvd_first_checks.py alone         hvd.init() only, groups from HOROVOD_LEADER_GROUP_SIZE

``hvd.init()`` runs before horovod_leader or mpi4py is imported, so Horovod starts MPI itself.
Then multi-leader LSGD trains: both levels of leaders exchange, and every rank finishes.
"""
import sys

import horovod.torch as hvd

hvd.init()  # before anything else touches MPI

import torch  # noqa: E402
from torch import nn  # noqa: E402

import horovod_leader as hl  # noqa: E402
from _common import check, value  # noqa: E402

mode = sys.argv[1]
with check(f"hvd_first_{mode}"):
    topo = hl.init(group_size=2) if mode == "then_init" else None
    torch.manual_seed(hvd.rank())
    model = nn.Linear(6, 2)
    opt = hl.LSGD(torch.optim.SGD(model.parameters(), lr=0.05), model, period=2, global_period=4)
    topo = opt.topology
    assert topo.num_groups == 2 and topo.groups == [[0, 1], [2, 3]], topo.groups
    for step in range(12):
        loss = model(torch.randn(8, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss)
    opt.close()
    value(f"hvd_first_{mode}_leaders", f"local={opt.local_leader} global={opt.global_leader} "
                                       f"process_set={type(topo.process_set).__name__}")
    assert opt.local_leader in topo.groups[topo.group] and opt.global_leader is not None
    # the group leaders' copies arrived, the same within each group
    copy_sum = sum(float(t.double().sum()) for t in opt._copies["local"].values())
    sums = hvd.allgather(torch.tensor([copy_sum], dtype=torch.float64), name="test.copies").tolist()
    assert sums[0] == sums[1] and sums[2] == sums[3] and sums[0] != sums[2], sums

hvd.shutdown()
