"""Train a model with LSGD, GRAWA or a baseline, under horovodrun or mpirun.

    mpirun -np 4 python -m horovod_leader.train --algo lsgd --time-budget 60 --out runs/lsgd
    horovodrun -np 8 -H host1:4,host2:4 horovod-leader-train --algo mgrawa --dataset cifar10 \\
        --data-dir /data --model resnet20 --epochs 200 --out runs/mgrawa

Every rank trains on a disjoint shard of the training data. At intervals the test accuracy of
the global leader (LSGD) and of the centre (the workers' average with batch-norm statistics
re-estimated on training batches; EASGD's centre variable) is measured. Rank 0 shows a
progress bar and writes ``OUT/config.json`` and ``OUT/metrics.jsonl`` (one record per
evaluation); checkpoints go to ``OUT/checkpoints`` and ``--resume OUT`` continues from the
last one. ``python -m horovod_leader.report OUT ...`` turns runs into a table and plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ALGOS = ("lsgd", "mgrawa", "lgrawa", "easgd", "localsgd", "dp")
ASYNC_ALGOS = ("lsgd", "mgrawa", "lgrawa", "easgd")


class _Parser(argparse.ArgumentParser):
    """Parse errors raise instead of exiting, so that they go through the same all-rank
    agreement as the other checks: a rank must not leave while the others wait for it."""

    def error(self, message):
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    from horovod_leader.data import DATASETS
    from horovod_leader.models import MODELS

    p = _Parser(prog="horovod-leader-train", description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("algorithm and data")
    g.add_argument("--algo", default="lsgd", choices=ALGOS)
    g.add_argument("--async", dest="asynchronous", action="store_true",
                   help="asynchronous variant (lsgd, mgrawa, lgrawa, easgd)")
    g.add_argument("--model", default="cnn", choices=MODELS)
    g.add_argument("--dataset", default="digits", choices=DATASETS)
    g.add_argument("--data-dir", default="data", help="where cifar10 lives (cifar-10-batches-py)")
    g.add_argument("--download", action="store_true", help="download cifar10 into --data-dir")
    g = p.add_argument_group("budget and topology")
    g.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    g.add_argument("--epochs", type=float, default=None, help="stop after this many epochs (default 10 "
                   "when no --time-budget)")
    g.add_argument("--group-size", type=int, default=None, help="ranks per group (default: ranks per node)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU of this rank's local rank when CUDA is available")
    g = p.add_argument_group("hyperparameters (defaults: the papers' CIFAR-10 settings)")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--batch-size", type=int, default=128, help="per worker")
    g.add_argument("--period", type=int, default=None,
                   help="communication period tau (default: 4 for lsgd/easgd/localsgd, 32 for grawa)")
    g.add_argument("--global-period", type=int, default=None, help="LSGD's tau_G (default: 4 x period)")
    g.add_argument("--local-pull", type=float, default=0.1, help="LSGD's lambda")
    g.add_argument("--global-pull", type=float, default=0.1, help="LSGD's lambda_G")
    g.add_argument("--pull", type=float, default=0.5, help="GRAWA's pull")
    g.add_argument("--prox", type=float, default=0.0, help="per-step proximal pull (LSGD, GRAWA)")
    g.add_argument("--score-window", type=int, default=None, help="LSGD: losses averaged into the score")
    g.add_argument("--norm-decay", type=float, default=0.0, help="GRAWA: smoothing of the gradient norms")
    g.add_argument("--beta", type=float, default=0.9, help="EASGD's beta (alpha = beta / workers)")
    g.add_argument("--lr-milestones", type=float, nargs="*", default=[], help="epochs at which the LR drops")
    g.add_argument("--lr-time-milestones", type=float, nargs="*", default=[],
                   help="wall-clock seconds at which the LR drops (the papers' time-based schedule)")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="LR factor at each milestone")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/run", help="output folder")
    g.add_argument("--eval-every", type=float, default=None,
                   help="seconds between evaluations (default: about 10 per run)")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--resume", default=None, metavar="OUT", help="continue the run in OUT from its last checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def validate(args) -> None:
    """Every check that needs no communication, on every rank, before any collective."""
    from horovod_leader.validation import check_fraction, check_int, check_multiple, check_real

    if args.time_budget is None and args.epochs is None:
        args.epochs = 10.0
    if args.time_budget is not None:
        check_real("--time-budget", args.time_budget, 0.0, math.inf, low_open=True)
    if args.epochs is not None:
        check_real("--epochs", args.epochs, 0.0, math.inf, low_open=True)
    if args.asynchronous and args.algo not in ASYNC_ALGOS:
        raise ValueError(f"--async is available for {list(ASYNC_ALGOS)}, not --algo {args.algo}")
    check_real("--lr", args.lr, 0.0, math.inf)
    check_real("--momentum", args.momentum, 0.0, 1.0, high_open=True)
    check_real("--weight-decay", args.weight_decay, 0.0, math.inf)
    check_int("--batch-size", args.batch_size)
    if args.period is None:
        args.period = 32 if args.algo in ("mgrawa", "lgrawa") else 4
    check_int("--period", args.period)
    if args.global_period is None:
        args.global_period = 4 * args.period
    check_int("--global-period", args.global_period)
    check_multiple("--global-period", args.global_period, "--period", args.period)
    for name in ("local_pull", "global_pull", "pull", "prox"):
        check_fraction("--" + name.replace("_", "-"), getattr(args, name))
    if args.score_window is not None:
        check_int("--score-window", args.score_window)
    check_real("--norm-decay", args.norm_decay, 0.0, 1.0, high_open=True)
    check_real("--beta", args.beta, 0.0, 1.0, low_open=True)
    check_real("--lr-gamma", args.lr_gamma, 0.0, 1.0, low_open=True)
    for value in args.lr_milestones + args.lr_time_milestones:
        check_real("--lr-milestones/--lr-time-milestones", value, 0.0, math.inf)
    if args.eval_every is not None:
        check_real("--eval-every", args.eval_every, 0.0, math.inf, low_open=True)
    check_int("--checkpoint-every", args.checkpoint_every, minimum=0)
    if args.dataset == "cifar10" and not args.download and not os.path.isdir(os.path.join(args.data_dir,
                                                                                        "cifar-10-batches-py")):
        raise ValueError(f"--data-dir {args.data_dir!r} has no cifar-10-batches-py folder (or pass --download)")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available on this node")
    if args.model == "vgg16" and args.dataset == "digits":
        raise ValueError("--model vgg16 needs 32x32 colour images: use --dataset cifar10 or synthetic")
    if args.resume is not None:
        from horovod_leader.checkpoint import latest_step
        if latest_step(args.resume) is None:
            raise ValueError(f"--resume {args.resume!r} holds no checkpoint (expected {args.resume}/checkpoints)")
    from mpi4py import MPI
    from horovod_leader.topology import resolve_group_size
    resolve_group_size(args.group_size, MPI.COMM_WORLD.Get_size())


def make_wrapper(args, optimizer, model):
    import horovod_leader as hl

    if args.algo == "lsgd":
        return hl.LSGD(optimizer, model, period=args.period, global_period=args.global_period,
                       local_pull=args.local_pull, global_pull=args.global_pull, prox=args.prox,
                       score_window=args.score_window, asynchronous=args.asynchronous)
    if args.algo in ("mgrawa", "lgrawa"):
        return hl.GRAWA(optimizer, model, period=args.period, pull=args.pull, layerwise=args.algo == "lgrawa",
                        prox=args.prox, norm_decay=args.norm_decay, asynchronous=args.asynchronous)
    if args.algo == "easgd":
        return hl.EASGD(optimizer, model, period=args.period, beta=args.beta, asynchronous=args.asynchronous)
    if args.algo == "localsgd":
        return hl.LocalSGD(optimizer, model, period=args.period)
    return hl.DataParallel(optimizer, model)


class Trainer:
    """One run: data, model, wrapper, schedule, evaluation, checkpoints."""

    def __init__(self, args, topo):
        import horovod.torch as hvd
        import torch

        from horovod_leader import data, models

        self.args, self.topo, self.hvd, self.torch = args, topo, hvd, torch
        self.rank, self.size = topo.rank, topo.size
        self.out = Path(args.resume or args.out)
        torch.manual_seed(args.seed)
        train, self.test, channels, classes = data.load(args.dataset, args.data_dir, args.download, args.seed)
        self.train = data.shard(train, self.rank, self.size)
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(hvd.local_rank())
        self.device = torch.device("cuda", hvd.local_rank()) if use_cuda else torch.device("cpu")
        self.model = models.build(args.model, classes, channels).to(self.device)  # before wrapping
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                   nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)
        self.opt = make_wrapper(args, self.sgd, self.model)
        # Each epoch's order comes from (seed, rank, epoch) alone, so a resumed run replays it
        # exactly without carrying the generator's state across epochs.
        self.loader_gen = torch.Generator()
        self.loader = torch.utils.data.DataLoader(self.train, batch_size=args.batch_size, shuffle=True,
                                                  drop_last=len(self.train) >= args.batch_size,
                                                  generator=self.loader_gen)
        self.steps_per_epoch = max(len(self.loader), 1)
        self.step = 0
        self.elapsed_before = 0.0  # wall time of earlier segments of a resumed run
        self.losses: List[float] = []

    # -------------------------------------------------------------- clock and schedule
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def agreed_elapsed(self) -> float:
        """Synchronous runs decide time-based events (stop, LR drop, evaluation) on rank 0's
        clock, so every rank takes the same decision at the same step. Asynchronous runs use
        their own clock: no collective per step is allowed there."""
        if self.args.asynchronous:
            return self.elapsed()
        value = self.torch.tensor([self.elapsed()], dtype=self.torch.float64)
        return float(self.hvd.broadcast(value, root_rank=0, name="train.clock"))

    def lr_at(self, epoch: float, seconds: float) -> float:
        drops = sum(epoch >= m for m in self.args.lr_milestones) + sum(seconds >= m for m in
                                                                       self.args.lr_time_milestones)
        return self.args.lr * self.args.lr_gamma ** drops

    # -------------------------------------------------------------- evaluation
    def accuracy(self, model) -> float:
        torch = self.torch
        model.eval()
        correct = 0
        with torch.no_grad():
            x, y = self.test.tensors
            for i in range(0, len(y), 1024):
                batch = x[i:i + 1024].to(self.device, non_blocking=True)
                correct += int((model(batch).argmax(1).cpu() == y[i:i + 1024]).sum())
        model.train()
        return correct / len(y)

    def centre_accuracy(self) -> float:
        """The workers' average (EASGD: its centre), batch-norm statistics re-estimated."""
        import copy

        from horovod_leader.flat import key_name

        torch = self.torch
        centre = copy.deepcopy(self.model)
        copies = list(centre.parameters())
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        with torch.no_grad():
            for key, flat in self.opt.params.items():  # one collective per packed buffer
                if self.args.algo == "easgd":
                    average = self.opt.centre[key]
                else:
                    average = flat.flat.clone()
                    self.hvd.allreduce_(average, op=self.hvd.Average, name=f"train.centre.{key_name(key)}")
                for tensor, view in zip(flat.tensors, flat.views(average)):
                    copies[index[id(tensor)]].copy_(view)
            norms = [m for m in centre.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            if norms:  # re-estimate on up to 20 training batches, as a cumulative average
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None
                centre.train()
                for i, (x, _) in enumerate(torch.utils.data.DataLoader(self.train, batch_size=self.args.batch_size)):
                    centre(x.to(self.device))
                    if i == 19:
                        break
        return self.accuracy(centre)

    def evaluate(self, seconds: float, epoch: float, final: bool = False) -> Optional[Dict]:
        torch, hvd = self.torch, self.hvd
        if self.args.asynchronous and not final:
            # No collectives between refreshes: rank 0 reports its own worker.
            if self.rank != 0:
                return None
            record = {"wall_time": seconds, "step": self.step, "epoch": epoch, "worker0_accuracy": self.accuracy(
                self.model), "loss": self.mean_loss(), "comm_bytes": self.opt.comm_bytes,
                "global_leader": getattr(self.opt, "global_leader", None)}
            return record
        own = torch.tensor([self.accuracy(self.model), self.mean_loss(), float(self.opt.comm_bytes), self.step],
                           dtype=torch.float64)
        everyone = hvd.allgather(own.reshape(1, -1), name="train.eval").tolist()
        leader = getattr(self.opt, "global_leader", None)
        record = {"wall_time": seconds, "step": self.step, "epoch": epoch,
                  "worker_accuracies": [row[0] for row in everyone], "losses": [row[1] for row in everyone],
                  "comm_bytes": [int(row[2]) for row in everyone], "steps": [int(row[3]) for row in everyone],
                  "global_leader": leader, "local_leaders": None, "centre_accuracy": self.centre_accuracy()}
        if self.args.algo == "lsgd":
            leaders = hvd.allgather(torch.tensor([[-1 if self.opt.local_leader is None else self.opt.local_leader]]),
                                    name="train.leaders").flatten().tolist()
            record["local_leaders"] = leaders
            record["leader_accuracy"] = record["worker_accuracies"][leader] if leader is not None else None
        return record

    def epoch_seed(self, epoch: int) -> int:
        return (self.args.seed * 1_000_003 + self.rank) * 10_007 + epoch

    def mean_loss(self) -> float:
        recent = self.losses[-20:]
        return sum(recent) / len(recent) if recent else float("nan")

    # -------------------------------------------------------------- the loop
    def run(self) -> None:
        from horovod_leader import checkpoint

        args, torch = self.args, self.torch
        if args.resume:
            checkpoint.load(self)
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps({**vars(args), "world_size": self.size,
                                                              "groups": self.topo.groups}, indent=2))
        total_steps = None if args.epochs is None else int(args.epochs * self.steps_per_epoch)
        budget = args.time_budget
        eval_every = args.eval_every or (budget / 10 if budget else None)
        eval_every_steps = None if eval_every else max((total_steps or 100) // 10, 1)
        sync_every = max(1, args.period if args.algo != "dp" else 10)
        bar = None
        if self.rank == 0 and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=total_steps, initial=self.step, desc=f"{args.algo}{' async' if args.asynchronous else ''}",
                       dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
        self.start = time.perf_counter()
        seconds = self.agreed_elapsed()
        next_eval = (seconds + eval_every) if eval_every else None
        last_acc = None
        done = False
        skip = self.step % self.steps_per_epoch  # resuming mid-epoch: skip the batches already seen
        epoch_index = self.step // self.steps_per_epoch
        while not done:
            self.loader_gen.manual_seed(self.epoch_seed(epoch_index))
            for i, (x, y) in enumerate(self.loader):
                if i < skip:
                    continue
                epoch = self.step / self.steps_per_epoch
                for group in self.sgd.param_groups:
                    group["lr"] = self.lr_at(epoch, seconds)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
                self.sgd.zero_grad()
                loss.backward()
                self.opt.step(loss)
                self.losses.append(loss.item())
                self.step += 1
                if bar is not None:
                    bar.update(1)
                    if self.step % 10 == 0:
                        bar.set_postfix(loss=f"{self.mean_loss():.3f}", leader=getattr(self.opt, "global_leader", "-"),
                                        acc="-" if last_acc is None else f"{last_acc:.3f}")
                check_now = self.args.asynchronous or self.step % sync_every == 0
                if check_now:
                    seconds = self.agreed_elapsed()
                epoch = self.step / self.steps_per_epoch
                done = (total_steps is not None and self.step >= total_steps) or (
                    budget is not None and check_now and seconds >= budget)
                due = (eval_every and check_now and seconds >= next_eval) or (
                    eval_every_steps and self.step % eval_every_steps == 0)
                if due and not done:
                    last_acc = self.record(self.evaluate(seconds, epoch))
                    next_eval = (seconds + eval_every) if eval_every else None
                if args.checkpoint_every and self.step % args.checkpoint_every == 0 and not args.asynchronous:
                    checkpoint.save(self, seconds)
                if done:
                    break
            if not done:
                skip = 0
                epoch_index += 1
        self.opt.close()
        seconds = self.elapsed()
        if not args.asynchronous:
            checkpoint.save(self, seconds)
        last_acc = self.record(self.evaluate(seconds, self.step / self.steps_per_epoch, final=True))
        if bar is not None:
            bar.close()
        if self.rank == 0:
            print(f"done: {self.step} steps in {seconds:.1f} s; final accuracy "
                  f"{last_acc if last_acc is None else round(last_acc, 4)}; metrics in {self.out / 'metrics.jsonl'}",
                  flush=True)

    def record(self, record: Optional[Dict]) -> Optional[float]:
        if record is None:
            return None
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        for key in ("leader_accuracy", "centre_accuracy", "worker0_accuracy"):
            if record.get(key) is not None:
                return record[key]
        return None


def parse_and_validate(argv: Optional[List[str]]):
    """(args, None) or (None, error message); never exits and never communicates."""
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        return args, None
    except ValueError as error:
        return None, str(error)


def main(argv: Optional[List[str]] = None) -> int:
    from mpi4py import MPI

    args, error = parse_and_validate(argv)
    # Every rank checked its own arguments without communicating; one small all-gather (which
    # every rank reaches, whatever its arguments) lets all of them stop together when any
    # rank's arguments are bad: no rank is left waiting in a collective.
    world = MPI.COMM_WORLD
    errors = world.allgather(error)
    if any(errors):
        if world.Get_rank() == 0:
            bad = sorted({e for e in errors if e})
            ranks = [r for r, e in enumerate(errors) if e]
            for message in bad:
                print(f"horovod-leader-train: error (ranks {ranks}): {message}", file=sys.stderr, flush=True)
        return 2
    import horovod_leader as hl

    topo = hl.init(group_size=args.group_size)
    Trainer(args, topo).run()
    import horovod.torch as hvd
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
