"""Run on an emulated cluster (launch/emulated_cluster.sh) of 2 nodes x 2 ranks, under any of
its launchers (mpirun, horovodrun in MPI mode, horovodrun --gloo).

    emulator_checks.py [--throughput] [--train OUT] [--fail-rank R] [--hold SECONDS]

Always: ``hl.init()`` finds one group per node (``groups_follow_nodes``).
``--throughput`` (MPI launchers): one message between the nodes runs at the links' rate, one
inside a node over shared memory much faster; printed as VALUE lines in Mbit/s.
``--train OUT``: a short run of the training command with multi-leader LSGD (``train_lsgd``).
``--train-async OUT``: the same asynchronously, across the nodes (``train_lsgd_async``).
``--fail-rank R``: rank R dies (exits with status 1 at once, as a crash would: no MPI
finalisation) right after initialisation, while the others go on into collectives; the
launcher must end the job and the emulator tear everything down.
``--hold S``: every rank prints READY and sleeps S seconds after initialisation (to interrupt
the run from outside).
"""
import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import horovod.torch as hvd

import horovod_leader as hl
from horovod_leader.launcher import launched_by_mpi
from _common import check, value

parser = argparse.ArgumentParser()
parser.add_argument("--throughput", action="store_true")
parser.add_argument("--nbytes", type=int, default=4 << 20)
parser.add_argument("--train", default=None, metavar="OUT")
parser.add_argument("--train-async", default=None, metavar="OUT")
parser.add_argument("--fail-rank", type=int, default=None)
parser.add_argument("--hold", type=float, default=0.0)
args = parser.parse_args()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: launchers tag and interleave the ranks' writes
    sys.stdout.flush()


topo = hl.init()
rank = topo.rank
if rank == args.fail_rank:
    say(f"rank {rank} fails on purpose")
    os._exit(1)
if args.hold:
    say(f"READY rank={rank}")
    time.sleep(args.hold)

with check("groups_follow_nodes"):
    # Each node is a namespace with its own hostname; init() must group by node from the
    # launcher's view (MPI's shared-memory split, or Horovod's local ranks in Gloo mode), not by
    # any block rule.
    hosts = hvd.allgather_object(socket.gethostname(), name="test.hostnames")
    assert hosts == ["node0", "node0", "node1", "node1"], hosts
    assert topo.groups == [[0, 1], [2, 3]], topo.describe()
    assert topo.group_ranks == [r for r, host in enumerate(hosts) if host == hosts[rank]]
    if launched_by_mpi():
        assert topo.comm.Get_size() == 2
    else:
        assert topo.comm is None
    value("mode", "mpi" if launched_by_mpi() else "gloo")
    # the MPI setting the launcher gave this rank (Open MPI passes --mca values as OMPI_MCA_*)
    value("yield_when_idle", os.environ.get("OMPI_MCA_mpi_yield_when_idle", "unset"))


def transfer_mbit(world, sender: int, receiver: int, nbytes: int) -> float:
    """Megabits per second of one ``nbytes`` message, timed on the sender until the
    receiver's acknowledgement: the whole message has arrived."""
    import numpy as np

    payload = np.ones(nbytes, dtype=np.uint8)
    ack = np.zeros(1, dtype=np.uint8)
    # A small message first opens the connection, then a pause lets the links' token buckets
    # refill, so every measurement starts from the same state.
    if rank == sender:
        world.Send(payload[:1024], dest=receiver, tag=1)
    elif rank == receiver:
        world.Recv(payload[:1024], source=sender, tag=1)
    world.Barrier()
    time.sleep(0.2)
    world.Barrier()
    elapsed = 0.0
    if rank == sender:
        start = time.perf_counter()
        world.Send(payload, dest=receiver, tag=2)
        world.Recv(ack, source=receiver, tag=3)
        elapsed = time.perf_counter() - start
    elif rank == receiver:
        world.Recv(payload, source=sender, tag=2)
        world.Send(ack, dest=sender, tag=3)
    elapsed = world.bcast(elapsed, root=sender)
    return nbytes * 8 / elapsed / 1e6


if args.throughput:
    with check("throughput"):
        from mpi4py import MPI

        inter = transfer_mbit(MPI.COMM_WORLD, 0, 2, args.nbytes)  # node0 -> node1: through both limited links
        # inside node0: shared memory. One 4 MB message takes about a millisecond there, as long
        # as a scheduling delay on these shared cores: the best of five is the memory's rate.
        intra = max(transfer_mbit(MPI.COMM_WORLD, 0, 1, args.nbytes) for _ in range(5))
        value("inter_mbit", f"{inter:.2f}")
        value("intra_mbit", f"{intra:.2f}")

if args.train:
    from horovod_leader.training import command as train

    # Groups follow the nodes here too: two local leaders, the global leader across the link.
    status = train.main(["--algo", "lsgd", "--period", "2", "--global-period", "4", "--time-budget", "3",
                         "--eval-every", "3", "--checkpoint-every", "0", "--no-progress", "--out", args.train])
    assert status == 0
    if rank == 0:
        records = [json.loads(line) for line in (Path(args.train) / "metrics.jsonl").read_text().splitlines()]
        assert records and records[-1]["step"] > 0 and len(records[-1]["steps"]) == 4, records[-1:]
        assert sorted(set(records[-1]["local_leaders"])) != [None], records[-1]
    # train.main shut Horovod down, so the pass line carries the rank taken before.
    say(f"PASS train_lsgd rank={rank}")

if args.train_async:
    from horovod_leader.training import command as train

    # Asynchronous LSGD across the nodes: the global step count lives in rank 0's counter
    # server over TCP (MPI's one-sided windows do not work across these nodes).
    status = train.main(["--algo", "lsgd", "--async", "--period", "2", "--global-period", "4", "--time-budget", "4",
                         "--eval-every", "100", "--checkpoint-every", "0", "--no-progress", "--out", args.train_async])
    assert status == 0
    if rank == 0:
        records = [json.loads(line) for line in (Path(args.train_async) / "metrics.jsonl").read_text().splitlines()]
        assert records and min(records[-1]["steps"]) > 0, records[-1:]
        say(f"VALUE async_steps rank=0 {records[-1]['steps']}")
    say(f"PASS train_lsgd_async rank={rank}")
