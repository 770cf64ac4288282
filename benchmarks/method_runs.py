"""What the method benchmarks share: the configurations compared, and timed training steps."""
from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch
from torch import nn

# (name, options of horovod_leader.train that build the wrapper)
CONFIGS: List[Tuple[str, List[str]]] = [
    ("LSGD tau=tau_G=16", ["--algo", "lsgd", "--period", "16", "--global-period", "16", "--group-size", "4"]),
    ("LSGD tau=tau_G=64", ["--algo", "lsgd", "--period", "64", "--global-period", "64", "--group-size", "4"]),
    ("LSGD 2 groups of 2, tau=4, tau_G=16", ["--algo", "lsgd", "--period", "4", "--global-period", "16",
                                             "--group-size", "2"]),
    ("MGRAWA tau=32", ["--algo", "mgrawa", "--period", "32", "--group-size", "4"]),
    ("LGRAWA tau=32", ["--algo", "lgrawa", "--period", "32", "--group-size", "4"]),
    ("EASGD tau=4", ["--algo", "easgd", "--period", "4", "--group-size", "4"]),
    ("LocalSGD tau=4", ["--algo", "localsgd", "--period", "4", "--group-size", "4"]),
    ("DataParallel", ["--algo", "dp", "--group-size", "4"]),
]


def theoretical_bytes_per_step(options: List[str], payload: int, tensors: int) -> float:
    """Bytes per worker per step that the algorithm must send, from its definition
    (``MethodSpec.expected_bytes``)."""
    from horovod_leader.registry import METHODS

    opts = dict(zip(options[::2], options[1::2]))
    return METHODS[opts["--algo"]].expected_bytes(opts, payload, tensors)


class MLP(nn.Module):
    """A communication-heavy model: 10.5M parameters, little computation per sample."""

    def __init__(self, inputs: int = 784, hidden: int = 2048, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x.flatten(1))


def build_wrapper(options: List[str], model: nn.Module):
    from horovod_leader.training.command import build_parser, make_wrapper, validate

    args = build_parser().parse_args(options + ["--lr", "0.01", "--out", "unused"])
    validate(args)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return make_wrapper(args, sgd, model), sgd


def timed_steps(opt, sgd, model, batches, steps: int, warmup: int) -> Dict:
    """Run ``warmup`` then ``steps`` steps; steps/s and bytes per step over the timed part."""
    import horovod.torch as hvd

    def one(i):
        x, y = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        sgd.zero_grad()
        loss.backward()
        opt.step(loss)

    for i in range(warmup):
        one(i)
    hvd.allreduce(torch.zeros(1), name="bench.sync")  # start the timed part together
    bytes_before, start = opt.comm_bytes, time.perf_counter()
    for i in range(steps):
        one(warmup + i)
    elapsed = time.perf_counter() - start
    sent = opt.comm_bytes - bytes_before  # read before close(): its last announcement is not a step's
    opt.close()
    return {"steps_per_s": steps / elapsed, "bytes_per_step": sent / steps}
