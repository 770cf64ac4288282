"""Helpers for the programs that tests/ runs under mpirun."""
# Collectives in these programs are always named: Horovod names unnamed ones by a per-process
# handle counter, which differs between ranks whose groups issued different numbers of ops.
from __future__ import annotations

import contextlib
import sys


def collectives():
    """The engine's collectives (Horovod, or the torch engine under torchrun), for the checks' own
    exchanges."""
    from horovod_leader import engine

    return engine.active()


@contextlib.contextmanager
def check(name: str):
    """Run a named check; print PASS on success (pytest demands it from every rank)."""
    yield
    _say(f"PASS {name} rank={_rank()}")


def value(key: str, text) -> None:
    _say(f"VALUE {key} rank={_rank()} {text}")


def _rank() -> int:
    """The rank in the whole job, also while Horovod runs on a smaller communicator."""
    from horovod_leader.launcher import world_rank

    return world_rank()


def _say(line: str) -> None:
    # One write per line: under mpirun, ranks' outputs interleave between writes.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()



def train_steps(model, opt, dataset, rank: int, steps: int, batch_size: int = 32, on_step=None) -> None:
    """Train for ``steps`` steps over this rank's shuffled shard; ``on_step(step)`` after each."""
    import torch
    from torch import nn

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(rank))
    step = 0
    while step < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step(loss)
            step += 1
            if on_step is not None:
                on_step(step)
            if step == steps:
                return


def test_accuracy(model, test) -> float:
    import torch

    with torch.no_grad():
        x, y = test.tensors
        return float((model(x).argmax(1) == y).float().mean())


def evaluated_accuracy(name: str, opt, model, test) -> float:
    """What the papers report: LSGD's global leader, EASGD's centre, else the workers' average."""
    import torch

    hvd = collectives()
    if name == "lsgd":
        accs = hvd.allgather(torch.tensor([test_accuracy(model, test)]), name=f"test.acc.{name}").tolist()
        return accs[opt.global_leader]
    with torch.no_grad():
        if name == "easgd":
            for flat, centre in zip(opt.params.values(), opt.centre().values()):
                flat.flat.copy_(centre)
        else:
            for flat in opt.params.values():
                hvd.allreduce_(flat.flat, op=hvd.Average, name=f"test.avg.{name}")
    return test_accuracy(model, test)
