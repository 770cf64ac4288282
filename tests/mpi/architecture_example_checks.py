"""docs/architecture.md's example, run as written (4 ranks): its plain-averaging class and its
registry entry, then the round against a hand computation and the training command with
``--algo plainavg``.

    architecture_example_checks.py OUT
"""
import re
import sys
from pathlib import Path

import horovod.torch as hvd
import torch
from torch import nn

import horovod_leader as hl
from _common import check

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
namespace = {}
for block in blocks:  # the class, then its registry entry
    exec(compile(block, str(DOC), "exec"), namespace)
PlainAverage = namespace["PlainAverage"]

topo = hl.init(group_size=2)
rank, size = topo.rank, topo.size

with check("example_round_is_the_average"):
    torch.manual_seed(rank)
    model = nn.Linear(3, 2)
    opt = PlainAverage(torch.optim.SGD(model.parameters(), lr=0.0), model, period=1)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    opt.step(loss)
    everyone = hvd.allgather(before.reshape(1, -1), name="test.example.before")
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(after, everyone.mean(0), atol=1e-6), (after, everyone.mean(0))
    opt.close()

with check("example_in_the_training_command"):
    from horovod_leader.training import command

    status = command.main(["--algo", "plainavg", "--epochs", "5", "--batch-size", "32", "--checkpoint-every", "0",
                           "--no-progress", "--out", sys.argv[1]])
    assert status == 0
    print(f"PASS example_in_the_training_command_ran rank={rank}", flush=True)
