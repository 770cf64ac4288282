"""One rank of a peer: what a user would pick instead of this toolkit, run through its own
public API on the cluster benchmark's data, model, batch, seed, budget and training clock.

    python benchmarks/peers/peer_rank.py --peer torch-localsgd [--link-counters DIR] TRAIN-OPTIONS...

Peers (``--peer``):

* ``torch-localsgd``: PyTorch's ``PostLocalSGDOptimizer`` with ``PeriodicModelAverager(period)``;
* ``torch-hierarchical``: the same with ``HierarchicalModelAverager``: every ``--period`` steps
  inside each group of ``--group-size`` ranks (a node), every ``--global-period`` across all;
* ``torchft-diloco``: torchft's ``DiLoCo`` (H = ``--period``, outer SGD with Nesterov momentum,
  ``--outer-lr`` and ``--outer-momentum``), one replica group per rank, with its lighthouse;
* ``torchft-localsgd``: torchft's ``LocalSGD`` (``sync_every`` = ``--period``);
* ``horovod-dp``: Horovod's own ``DistributedOptimizer``, as a check of the set-up against
  the toolkit's data-parallel SGD (``--algo dp``), which wraps the same.

TRAIN-OPTIONS are the training command's (``--preset paper --dataset mnist1d --model mlp
--time-budget 60 --seed 0 --out DIR ...``): they set the data, the model, the inner optimizer,
the batch, the budget and the evaluation times exactly as for the toolkit's runs. The
torch.distributed peers run on Gloo over the same links (their process group's rendezvous at
rank 0's address); the ranks themselves are started by mpirun (or the emulated cluster).
Every time-based decision is taken on rank 0's training clock, agreed at every step as in the
training command (``AgreedClock``), with evaluation excluded. Each evaluation measures the
workers' average (an all-reduce on a copy) on the test set. ``config.json`` and
``metrics.jsonl`` take the training command's form, so ``benchmarks/cluster_summary.py`` and
the report read them alike; ``comm_bytes`` is the payload of the collectives each rank joins
by the peer's definition (P per average), and the link counters measure what crossed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PEERS = ("torch-localsgd", "torch-hierarchical", "torchft-diloco", "torchft-localsgd", "horovod-dp")


def own_address():
    """(interface, IPv4 address) of this rank's first non-loopback interface: on an emulated
    node, its one link; on a plain machine, its network (loopback when it has none)."""
    import psutil

    for name, addresses in sorted(psutil.net_if_addrs().items()):
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return name, address.address
    return "lo", "127.0.0.1"


class TorchClockShim:
    """What ``AgreedClock`` needs of Horovod (a non-blocking broadcast and its wait), over
    torch.distributed."""

    def __init__(self, group=None):
        self.group = group

    def broadcast_async_(self, tensor, root_rank, name=None):
        import torch.distributed as dist

        return tensor, dist.broadcast(tensor, src=root_rank, group=self.group, async_op=True)

    @staticmethod
    def synchronize(handle):
        tensor, work = handle
        work.wait()
        return tensor


def payload(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, choices=PEERS)
    parser.add_argument("--link-counters", default=None)
    parser.add_argument("--lighthouse-port", type=int, default=29510)
    parser.add_argument("--store-port", type=int, default=29600)
    return parser.parse_known_args(argv)


def training_args(peer: str, rest):
    """The training command's parsed and checked options, for the method this peer matches."""
    from horovod_leader.training.command import parse_and_validate

    algo = {"torchft-diloco": "diloco", "horovod-dp": "dp"}.get(peer, "localsgd")
    args, error = parse_and_validate(["--algo", algo, *rest])
    if error:
        raise SystemExit(f"peer_rank: {error}")
    return args


class Peer:
    """The peer's optimizer and what it needs around it; ``step()`` after ``backward()``."""

    def __init__(self, kind: str, args, model, inner, rank: int, size: int, mpi):
        import torch
        import torch.distributed as dist

        self.kind, self.args, self.model, self.inner = kind, args, model, inner
        self.rounds = 0
        self.context = None
        if kind == "torch-localsgd":
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
            from torch.distributed.optim import PostLocalSGDOptimizer

            self.optimizer = PostLocalSGDOptimizer(inner, PeriodicModelAverager(period=args.period, warmup_steps=0))
        elif kind == "torch-hierarchical":
            from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
                HierarchicalModelAverager)
            from torch.distributed.optim import PostLocalSGDOptimizer

            levels = OrderedDict([(args.period, args.group_size), (args.global_period, size)])
            self.optimizer = PostLocalSGDOptimizer(inner, HierarchicalModelAverager(levels, warmup_steps=0))
        elif kind == "horovod-dp":
            import horovod.torch as hvd

            hvd.init(comm=mpi.COMM_WORLD)
            self.optimizer = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
        else:  # torchft
            from torchft import Manager, ProcessGroupGloo
            from torchft.local_sgd import DiLoCo, LocalSGD

            interface, address = own_address()
            lighthouse_host = mpi.COMM_WORLD.bcast(address if rank == 0 else None, root=0)
            self.lighthouse = None
            if rank == 0:
                beside = Path(sys.executable).parent / "torchft_lighthouse"  # a virtual environment's bin
                self.lighthouse = subprocess.Popen(
                    [str(beside) if beside.exists() else "torchft_lighthouse", "--bind", f"0.0.0.0:{args.lighthouse_port}", "--min_replicas", str(size),
                     "--join_timeout_ms", "60000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            mpi.COMM_WORLD.Barrier()
            store_port = args.store_port + rank
            self.store = dist.TCPStore(address, store_port, is_master=True, wait_for_workers=False)
            self.manager = Manager(
                pg=ProcessGroupGloo(timeout=timedelta(seconds=120)), min_replica_size=size,
                load_state_dict=lambda state: (model.load_state_dict(state["model"]),
                                               inner.load_state_dict(state["optimizer"])),
                state_dict=lambda: {"model": model.state_dict(), "optimizer": inner.state_dict()},
                use_async_quorum=False, init_sync=False, replica_id=f"replica_{rank}", rank=0, world_size=1,
                store_addr=address, store_port=store_port, hostname=address, port=args.store_port + 100 + rank,
                lighthouse_addr=f"http://{lighthouse_host}:{args.lighthouse_port}",
                quorum_timeout=timedelta(minutes=10), timeout=timedelta(seconds=120))
            if kind == "torchft-diloco":
                nesterov = args.outer_momentum > 0
                self.outer = torch.optim.SGD(model.parameters(), lr=args.outer_lr, momentum=args.outer_momentum,
                                             nesterov=nesterov)
                self.context = DiLoCo(self.manager, [model], inner, self.outer, sync_every=args.period,
                                      backup_device=torch.device("cpu"))
            else:
                self.context = LocalSGD(self.manager, model, inner, sync_every=args.period)
            self.context.__enter__()
            self.optimizer = inner

    def step(self, steps: int) -> None:
        self.optimizer.step()
        every = 1 if self.kind == "horovod-dp" else self.args.period
        # PyTorch's averagers average at their own count 0, p, 2p, ... (after steps 1, p + 1, ...)
        offset = 1 if self.kind in ("torch-localsgd", "torch-hierarchical") else 0
        if (steps - offset) % every == 0:
            self.rounds += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def close(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.manager.shutdown()
            if self.lighthouse is not None:
                self.lighthouse.terminate()


def centre_accuracy(model, test, rank: int, size: int, metric) -> float:
    """The workers' average on ``test`` (an (images, labels) pair, shared out among the ranks),
    on a copy. torchft's DiLoCo is measured like the others, as the workers' average, not its
    outer parameters (the toolkit's DiLoCo centre): the two agree right after each outer step."""
    import copy

    import torch
    import torch.distributed as dist

    centre = copy.deepcopy(model)
    with torch.no_grad():
        for p in centre.parameters():
            dist.all_reduce(p.data)
            p.data.div_(size)
    images, labels = test
    total = torch.tensor(metric.totals(centre, images[rank::size], labels[rank::size], "cpu"), dtype=torch.float64)
    dist.all_reduce(total)
    return metric.value(float(total[0]), int(total[1]))


def main(argv=None) -> int:
    own, rest = parse(sys.argv[1:] if argv is None else argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    ledger = None
    if own.link_counters:
        from horovod_leader.training.links import LinkLedger, counting_clock, local_rank

        if local_rank() == 0:
            ledger = LinkLedger(Path(own.link_counters) / f"{socket.gethostname()}.json")
    args = training_args(own.peer, rest)
    args.lighthouse_port, args.store_port = own.lighthouse_port, own.store_port
    args.group_size = args.group_size or world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()

    import torch
    import torch.distributed as dist

    from horovod_leader.training import data, models
    from horovod_leader.training.augment import BatchAugment
    from horovod_leader.training.clock import AgreedClock, TrainingClock
    from horovod_leader.training.command import make_optimizer
    from horovod_leader.training.metrics import cross_entropy, for_dataset
    from horovod_leader.training.pipeline import TrainPipeline
    from horovod_leader.training.schedule import LoopSchedule

    interface, address = own_address()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    master = world.bcast(address if rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{own.store_port - 1}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=300))
    torch.manual_seed(args.seed)
    train, test, channels, classes = data.load(args.dataset, args.data_dir, False, args.seed,
                                               samples=args.mnist1d_samples)
    pipeline = TrainPipeline(train, rank, size, args.batch_size, args.seed, args.sampling,
                             BatchAugment(args.augment, data.black_level(args.dataset)), torch.device("cpu"))
    model = models.build(args.model, classes, channels, input_shape=train.tensors[0].shape[1:], width=args.width)
    inner = make_optimizer(args, model)
    peer = Peer(own.peer, args, model, inner, rank, size, MPI)
    metric = for_dataset(args.dataset)
    clock = (counting_clock(ledger) if ledger is not None else TrainingClock)()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**vars(args), "algo": own.peer, "peer": own.peer,
                                                      "world_size": size, "metric": metric.name}, indent=2))
    schedule = LoopSchedule(steps_per_epoch=pipeline.steps_per_epoch, epochs=args.epochs,
                            time_budget=args.time_budget, eval_every=args.eval_every, checkpoint_every=0,
                            lr=args.lr, lr_gamma=args.lr_gamma, lr_milestones=args.lr_milestones,
                            lr_time_milestones=args.lr_time_milestones)
    clock.start()
    agreed = AgreedClock(clock, TorchClockShim(), False, cycle=max(args.period, args.global_period))
    seconds, _ = agreed.start()
    bytes_per_round = payload(model)
    test_full = test.tensors  # as the toolkit's evaluator: --eval-subset N spread evenly, the whole at the end
    count = len(test_full[1]) if args.eval_subset is None else min(args.eval_subset, len(test_full[1]))
    pick = torch.linspace(0, len(test_full[1]) - 1, count).round().long()
    test_subset = (test_full[0][pick], test_full[1][pick])
    steps, done, epoch = 0, False, 0
    losses = []

    def record(final=False):
        wall = clock.wall_seconds()
        trained = clock.train_seconds()
        with clock.excluded():
            accuracy = centre_accuracy(model, test_full if final else test_subset, rank, size, metric)
            everyone = [None] * size
            mine = [steps, peer.rounds * bytes_per_round, sum(losses[-20:]) / max(len(losses[-20:]), 1)]
            everyone = world.allgather(mine)
            if rank == 0:
                row = {"train_seconds": trained, "wall_seconds": wall, "step": steps, "epoch": steps /
                       pipeline.steps_per_epoch, "steps": [e[0] for e in everyone],
                       "comm_bytes": [e[1] for e in everyone], "losses": [e[2] for e in everyone],
                       metric.keys["centre"]: accuracy}
                if final and args.time_budget is not None:
                    row["time_budget"] = args.time_budget
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")

    while not done:
        for x, y in pipeline.batches(epoch):
            for group in inner.param_groups:
                group["lr"] = schedule.lr_at(steps, seconds)
            loss = cross_entropy(model(x), y)
            peer.zero_grad()
            loss.backward()
            steps += 1
            peer.step(steps)
            losses.append(float(loss))
            seconds, _ = agreed.after_step()
            done = schedule.done(steps, seconds)
            if schedule.evaluation_due(steps, seconds) and not done:
                record()
            if done:
                break
        epoch += 1
    agreed.finish()
    record(final=True)
    peer.close()
    if ledger is not None:
        ledger.write()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
