"""Centres measured by the training command's evaluator against direct computations (4 ranks, 2 groups).

Every rank holds different parameters. Each check rebuilds the expected centre in one process
from all ranks' parameters: the plain average of the group (or of everyone), its batch-norm
statistics re-estimated over the training batches in order, then counts correct test answers.
"""
import copy
import types

import horovod.torch as hvd
import torch
from torch.nn.utils import vector_to_parameters
from torch.utils.data import TensorDataset

import horovod_leader as hl
from horovod_leader.packing import pack
from horovod_leader.training.evaluation import Evaluator, count_correct, reestimate_batch_norm
from horovod_leader.training.pipeline import TrainPipeline
from _common import check

topo = hl.init(group_size=2)
rank, size = topo.rank, topo.size
gen = torch.Generator().manual_seed(0)
train = TensorDataset(torch.randn(200, 3, 8, 8, generator=gen) * 2 + 1, torch.randint(0, 10, (200,), generator=gen))
test = TensorDataset(torch.randn(64, 3, 8, 8, generator=gen) * 2 + 1, torch.randint(0, 10, (64,), generator=gen))
torch.manual_seed(100 + rank)  # a different model on every rank
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 10))
opt = types.SimpleNamespace(params=pack(model.parameters()))
pipeline = TrainPipeline(train, rank, size, 16, seed=0)
evaluator = Evaluator(model, opt, "lsgd", pipeline, test, topo, hvd, torch.device("cpu"), bn_batches=None)
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
everyone = hvd.allgather(flat[None], name="check.params")  # (ranks, parameters)


def direct(ranks, batches):
    """The centre of ``ranks`` computed in this one process."""
    centre = copy.deepcopy(model)
    vector_to_parameters(everyone[ranks].mean(0), centre.parameters())
    reestimate_batch_norm(centre, iter([train.tensors[0][k * 16:(k + 1) * 16] for k in range(batches)]))
    return centre


def same_statistics(a, b):
    return (torch.allclose(a[1].running_mean, b[1].running_mean, atol=1e-5)
            and torch.allclose(a[1].running_var, b[1].running_var, atol=1e-5)
            and int(a[1].num_batches_tracked) == int(b[1].num_batches_tracked))


def accuracy(centre):
    return count_correct(centre, *test.tensors, torch.device("cpu")) / 64


with check("group_centres"):
    accuracies = evaluator.group_centre_accuracies()
    assert len(accuracies) == 2
    for g, ranks in enumerate(topo.groups):
        assert accuracies[g] == accuracy(direct(ranks, 12)), (g, accuracies)
    mine = evaluator.centre(topo.process_set, topo.group_rank, topo.group_size, "check.group")
    assert same_statistics(mine, direct(topo.group_ranks, 12))
    assert not torch.allclose(direct([0, 1], 12)[4].weight, direct([2, 3], 12)[4].weight)  # the groups differ

with check("full_pass_bn"):  # 200 // 16 = 12 full batches, shared out among 4 ranks
    centre = evaluator.centre(hvd.global_process_set, rank, size, "check.global")
    expected = direct(list(range(size)), 12)
    assert same_statistics(centre, expected)
    assert evaluator.centre_accuracy(hvd.global_process_set, rank, size, "check.acc") == accuracy(expected)

with check("limited_bn"):  # the first 3 batches only (3 < 4 ranks: one rank sees none)
    evaluator.bn_batches = 3
    centre = evaluator.centre(hvd.global_process_set, rank, size, "check.limited")
    assert same_statistics(centre, direct(list(range(size)), 3))
hvd.shutdown()
