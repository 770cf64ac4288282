"""Topology under 4 ranks: groups, group process sets, bad group sizes, node grouping."""
import os

import horovod.torch as hvd
import pytest
import torch

import horovod_leader as hl
from _common import check

topo = hl.init(group_size=2)
rank = topo.rank

with check("membership"):
    assert topo.size == 4 and hvd.size() == 4
    assert topo.num_groups == 2
    assert topo.group == rank // 2
    assert topo.group_ranks == ([0, 1] if rank < 2 else [2, 3])
    assert topo.group_rank == rank % 2
    assert topo.groups == [[0, 1], [2, 3]]
    assert topo.comm.Get_size() == 2 and topo.comm.Get_rank() == rank % 2

with check("group_broadcast"):
    # Each group's last rank broadcasts on the group's process set (root is a *global* rank).
    value = torch.tensor([float(rank * 10)])
    root = topo.group_ranks[-1]
    hvd.broadcast_(value, root_rank=root, process_set=topo.process_set, name="test.group_bcast")
    assert value.item() == root * 10
    # It reached exactly its group: the other group kept its own root's value.
    assert hvd.allgather(value, name="test.gather").tolist() == [10.0, 10.0, 30.0, 30.0]

with check("bad_group_size"):
    for bad in (3, 0, -2, 2.5, "2", True):
        with pytest.raises(ValueError, match="group_size"):
            hl.init(group_size=bad)
    # Horovod is still usable after the refusals: nothing was left half-initialised.
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name="test.alive").item() == 4.0

with check("env_group_size"):
    os.environ["HOROVOD_LEADER_GROUP_SIZE"] = "1"
    try:
        topo1 = hl.init()
    finally:
        del os.environ["HOROVOD_LEADER_GROUP_SIZE"]
    assert topo1.num_groups == 4 and topo1.group_ranks == [rank]

with check("node_groups"):
    # All four ranks share this machine: grouping by node gives one group of four,
    # whose process set is Horovod's global one.
    topo_node = hl.init()
    assert topo_node.groups == [[0, 1, 2, 3]]
    assert topo_node.process_set == hvd.global_process_set

hvd.shutdown()
