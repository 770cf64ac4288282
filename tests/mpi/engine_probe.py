"""Print this rank's engine, groups and host, then train LSGD or MGRAWA a few steps on digits
and save its parameters (``--save FILE``): the engine-equality and emulated-torchrun checks."""
import argparse
import socket

import torch

import horovod_leader as hl
from horovod_leader.training.command import Trainer, parse_and_validate

parser = argparse.ArgumentParser()
parser.add_argument("--algo", default=None)
parser.add_argument("--save", default=None)
own, rest = parser.parse_known_args()
topo = hl.init(group_size=None)
print(f"ENGINE {hl.engine.name()} rank={topo.rank} host={socket.gethostname()} groups={topo.groups}", flush=True)
if own.algo:
    args, error = parse_and_validate(["--algo", own.algo, "--dataset", "digits", "--no-progress", *rest])
    assert error is None, error
    trainer = Trainer(args, topo)
    trainer.run()
    if topo.rank == 0:
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, own.save)
hl.engine.active().shutdown()
