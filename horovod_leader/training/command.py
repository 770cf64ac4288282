"""Train a model with LSGD, GRAWA, EASGD, local SGD, DiLoCo or data-parallel SGD, under horovodrun or mpirun.

    mpirun -np 4 python -m horovod_leader.train --algo lsgd --time-budget 60 --out runs/lsgd
    horovodrun -np 8 -H host1:4,host2:4 horovod-leader-train --preset paper --algo mgrawa \\
        --dataset cifar10 --data-dir /data --model resnet20 --time-budget 900 --out runs/mgrawa

Each epoch the training set is reshuffled and split into one disjoint slice per rank
(``--sampling``); CIFAR-10 batches are augmented as tensors (``--augment``). At intervals of
training time the test accuracy of every worker, of the global leader (LSGD), of the centre
(the workers' average with batch-norm statistics re-estimated; EASGD's centre variable,
DiLoCo's outer parameters) and, in multi-leader runs, of each group's centre is measured;
evaluation time does not count as training time. Rank 0 shows progress (a bar on a terminal,
a line every 10 s on piped output) and writes ``OUT/config.json`` and ``OUT/metrics.jsonl``
(one record per evaluation); checkpoints go to ``OUT/checkpoints`` and ``--resume OUT``
continues from the last one with the configuration saved in ``OUT/config.json``.
``python -m horovod_leader.report OUT ...`` turns runs into a table and plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from horovod_leader.registry import METHODS



def async_algos() -> tuple:
    """The methods that offer ``--async`` (read when needed: a method registered later counts)."""
    return tuple(name for name, spec in METHODS.items() if spec.asynchronous)


def compressed_algos() -> tuple:
    """The methods that offer ``--compression`` (the one-sided EASGD variant does not)."""
    return tuple(name for name, spec in METHODS.items() if spec.compression)

INNER_OPTIMIZERS = ("sgd", "adamw")
EASGD_VARIANTS = ("rounds", "one-sided")
ADAMW_LR = 1e-3  # --lr's default with --inner-optimizer adamw


class _Parser(argparse.ArgumentParser):
    """Parse errors raise instead of exiting, so that they go through the same all-rank
    agreement as the other checks: a rank must not leave while the others wait for it."""

    def error(self, message):
        raise ValueError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once: ``(default: X)`` is added unless the help text already
    states the default in words (options whose default depends on others have default None and
    say so), and not for on/off flags."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or (
                action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)):
            return text
        if action.default == []:
            return (text + " (default: none)").strip()
        return (text + " (default: %(default)s)").strip()


def _bn_batches(text: str):
    if text == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'full', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'full', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from horovod_leader.compression import CODECS
    from horovod_leader.optim import EASGD, GRAWA, LSGD, DiLoCo
    from horovod_leader.training.data import DATASETS
    from horovod_leader.training.models import MODELS
    from horovod_leader.training.augment import AUGMENTATIONS
    from horovod_leader.training.pipeline import SAMPLINGS
    from horovod_leader.training.presets import PRESETS

    p = _Parser(prog="horovod-leader-train", description=__doc__.splitlines()[0],
                formatter_class=_HelpFormatter)
    g = p.add_argument_group("algorithm and data")
    g.add_argument("--algo", default="lsgd", choices=tuple(METHODS),
                   help="method: " + "; ".join(f"{name}: {spec.summary}" for name, spec in METHODS.items()))
    g.add_argument("--async", dest="asynchronous", action="store_true",
                   help=f"asynchronous variant ({', '.join(async_algos())})")
    g.add_argument("--easgd-variant", default="rounds", choices=EASGD_VARIANTS,
                   help="easgd: rounds = the centre replicated and updated in elastic rounds (what the LSGD and "
                        "GRAWA papers compared against; synchronous, or asynchronous with --async); one-sided = "
                        "the EASGD paper's asynchronous EASGD, a sharded centre reached by one-sided MPI with no "
                        "collectives (asynchronous by nature: give --async too; CPU only)")
    g.add_argument("--inner-optimizer", default="sgd", choices=INNER_OPTIMIZERS,
                   help="every worker's local optimizer, for every --algo (DiLoCo's inner optimizer): sgd = SGD "
                        "with --momentum and --nesterov; adamw = AdamW with betas (0.9, 0.999) and decoupled "
                        "--weight-decay (the DiLoCo paper's choice; sgd keeps the methods comparable)")
    g.add_argument("--compression", default="none", choices=("none", *CODECS),
                   help=f"what the methods exchange, compressed ({', '.join(compressed_algos())}): LSGD's leader "
                        "broadcasts, the others' averages; not the one-sided easgd")
    g.add_argument("--preset", default=None, choices=PRESETS,
                   help="paper: the authors' hyperparameters for --algo and --model; options given explicitly win")
    g.add_argument("--model", default="cnn", choices=MODELS, help="network")
    g.add_argument("--dataset", default="digits", choices=DATASETS, help="data set")
    g.add_argument("--data-dir", default="data", help="where cifar10 lives (cifar-10-batches-py)")
    g.add_argument("--download", action="store_true", help="download cifar10 into --data-dir")
    g.add_argument("--mnist1d-samples", type=int, default=None,
                   help="mnist1d: signals generated, train and test together (default 50000)")
    g.add_argument("--width", type=int, default=None, help="mlp: units per hidden layer (default 2000)")
    g.add_argument("--augment", default=None, choices=AUGMENTATIONS,
                   help="paper: flip + random 28x28 crop (test: centre crop); standard: pad 4, random 32x32 crop, "
                        "flip; default: paper for cifar10 (standard for vgg16, which needs 32x32), none otherwise")
    g.add_argument("--sampling", default="reshuffle", choices=SAMPLINGS,
                   help="reshuffle: one permutation of the training set per epoch, one slice per rank; "
                        "fixed: a fixed shard per rank")
    g = p.add_argument_group("budget and topology")
    g.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds of training time (evaluation excluded)")
    g.add_argument("--epochs", type=float, default=None, help="stop after this many epochs (default 10 "
                   "when no --time-budget)")
    g.add_argument("--group-size", type=int, default=None,
                   help="ranks per group (by default the ranks of each node form a group)")
    g.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    g.add_argument("--backend", default=None, choices=("horovod", "torch"),
                   help="the collectives underneath: horovod (MPI or Gloo) or torch (torch.distributed, launched by "
                        "torchrun); default: HOROVOD_LEADER_BACKEND, else torch under torchrun, else horovod")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU of this rank's local rank when CUDA is available")
    g = p.add_argument_group("hyperparameters (see --preset paper for the authors' CIFAR-10 settings)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate of the workers' optimizer (default 0.1; {ADAMW_LR:g} with "
                        f"--inner-optimizer adamw)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (--inner-optimizer sgd)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="SGD's Nesterov momentum (--inner-optimizer sgd)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="L2 (sgd) or decoupled (adamw) weight decay")
    g.add_argument("--batch-size", type=int, default=128, help="per worker")
    g.add_argument("--period", type=int, default=None,
                   help="communication period tau: steps between rounds (default: " + ", ".join(
                       f"{spec.period} for {name}" for name, spec in METHODS.items() if spec.period) + ")")
    g.add_argument("--overlap", type=int, default=0,
                   help="d: a synchronous round posted at step k is applied at step k + d, its correction computed "
                        "from what each worker sent, while the exchange crosses the links (0: at once; smaller than "
                        "--period; " + ", ".join(n for n, spec in METHODS.items() if "overlap" in spec.options) + ")")
    g.add_argument("--global-period", type=int, default=None,
                   help=f"lsgd's tau_G (default {LSGD.CLI_GLOBAL_PERIOD_FACTOR} x --period, the authors' tau = tau_G/4)")
    g.add_argument("--local-pull", type=float, default=LSGD.DEFAULT_PULL, help="lsgd's lambda")
    g.add_argument("--global-pull", type=float, default=LSGD.DEFAULT_PULL, help="lsgd's lambda_G")
    g.add_argument("--pull", type=float, default=GRAWA.DEFAULT_PULL, help="mgrawa's and lgrawa's pull lambda")
    g.add_argument("--prox", type=float, default=0.0, help="per-step proximal pull (lsgd, mgrawa, lgrawa)")
    g.add_argument("--score-window", type=int, default=None,
                   help="lsgd: losses averaged into the score (default --period)")
    g.add_argument("--norm-decay", type=float, default=0.0,
                   help="mgrawa, lgrawa: smoothing of the gradient norms")
    g.add_argument("--fresh-batch", type=int, default=0,
                   help="mgrawa, lgrawa: weights from the gradient on this many fresh random training samples at "
                        "each averaging (0: the current minibatch's gradient)")
    g.add_argument("--beta", type=float, default=EASGD.DEFAULT_BETA, help="easgd's beta (alpha = beta / workers)")
    g.add_argument("--outer-lr", type=float, default=DiLoCo.DEFAULT_OUTER_LR, help="diloco's outer learning rate")
    g.add_argument("--outer-momentum", type=float, default=DiLoCo.DEFAULT_OUTER_MOMENTUM,
                   help="diloco's outer Nesterov momentum (0: plain outer SGD)")
    g.add_argument("--lr-milestones", type=float, nargs="*", default=[], help="epochs at which the LR drops")
    g.add_argument("--lr-time-milestones", type=float, nargs="*", default=[],
                   help="seconds of training time (evaluation excluded) at which the LR drops, as in the papers")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="LR factor at each milestone")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--out", default="runs/run", help="output folder")
    g.add_argument("--eval-every", type=float, default=None,
                   help="seconds of training time between evaluations (default a tenth of --time-budget; "
                        "without a budget, every tenth of the steps)")
    g.add_argument("--eval-subset", type=int, default=None, metavar="N",
                   help="intermediate evaluations on N test samples spread evenly over the test set (a fixed "
                        "subset, the same for every method); the last evaluation of the centre uses the whole test set; each "
                        "worker's own model is always measured on the subset")
    g.add_argument("--bn-batches", type=_bn_batches, default=20, metavar="N|full",
                   help="training batches over which the centre's batch-norm statistics are re-estimated "
                        "(full: a whole pass, the authors' choice)")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--flatness", action="store_true",
                   help="at the end, the Hessian trace and top eigenvalue of the centre (and LSGD's leader) on "
                        "the first --flatness-batches training batches, into metrics.jsonl")
    g.add_argument("--flatness-batches", type=int, default=10, help="training batches for --flatness")
    g.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run in OUT from its last checkpoint, with the configuration saved in "
                        "OUT/config.json; options given again must repeat it, except --time-budget, --epochs, "
                        "--eval-every, --eval-subset, --checkpoint-every and --no-progress")
    g.add_argument("--no-progress", action="store_true", help="no progress display")
    return p


def validate(args, explicit=frozenset()) -> None:
    """Every check that needs no communication, on every rank, before any collective.
    ``explicit``: the destinations given on the command line (some options are refused only
    when given for a method they do not apply to)."""
    from horovod_leader.training import data, models
    from horovod_leader.training import augment
    from horovod_leader.validation import check_fraction, check_int, check_multiple, check_real

    if args.time_budget is None and args.epochs is None:
        args.epochs = 10.0
    if args.time_budget is not None:
        check_real("--time-budget", args.time_budget, 0.0, math.inf, low_open=True)
    if args.epochs is not None:
        check_real("--epochs", args.epochs, 0.0, math.inf, low_open=True)
    if args.asynchronous and args.algo not in async_algos():
        raise ValueError(f"--async is available for {list(async_algos())}, not --algo {args.algo}")
    validate_method_options(args, explicit)
    from horovod_leader import engine
    from horovod_leader.launcher import launched_by_mpi, mpi_required_message
    torch_engine = engine.choose(args.backend) == "torch"
    if args.asynchronous and not launched_by_mpi() and not torch_engine:
        raise ValueError(mpi_required_message("--async"))
    if torch_engine and args.algo == "easgd" and args.easgd_variant == "one-sided":
        raise ValueError("--easgd-variant one-sided keeps its centre in MPI windows, which the torch engine does not "
                         "have: give --backend horovod and launch with mpirun or horovodrun in MPI mode")
    if torch_engine and args.flatness:
        raise ValueError("--flatness measures with Horovod process sets, which the torch engine does not have yet: "
                         "give --backend horovod (mpirun or horovodrun), or measure afterwards with "
                         "horovod_leader.hessian on one process")
    check_real("--lr", args.lr, 0.0, math.inf)
    check_real("--momentum", args.momentum, 0.0, 1.0, high_open=True)
    check_real("--weight-decay", args.weight_decay, 0.0, math.inf)
    check_int("--batch-size", args.batch_size)
    spec = METHODS[args.algo]
    if args.period is None:
        args.period = spec.period or 1  # the method's default (data-parallel SGD: every step)
    check_int("--period", args.period)
    for dest, default in spec.cli_defaults.items():  # written out, so that config.json shows them
        if getattr(args, dest) is None:
            setattr(args, dest, default(args))
    if args.global_period is None:
        args.global_period = args.period  # only LSGD uses it
    check_int("--global-period", args.global_period)
    check_multiple("--global-period", args.global_period, "--period", args.period)
    check_int("--overlap", args.overlap, minimum=0)
    if args.overlap:
        if "overlap" not in spec.options or (args.algo == "easgd" and args.easgd_variant == "one-sided"):
            raise ValueError(f"--overlap is not available with --algo {args.algo}"
                             + (" --easgd-variant one-sided" if args.algo == "easgd" else "") + "; it covers "
                             f"{[n for n, s in METHODS.items() if 'overlap' in s.options]}")
        if args.asynchronous:
            raise ValueError("--overlap is for synchronous rounds: asynchronous rounds already run while the workers "
                             "step (drop --overlap or --async)")
        if args.overlap >= args.period:
            raise ValueError(f"--overlap {args.overlap} must be smaller than --period {args.period}")
    for name in ("local_pull", "global_pull", "pull", "prox"):
        check_fraction("--" + name.replace("_", "-"), getattr(args, name))
    if args.score_window is not None:
        check_int("--score-window", args.score_window)
    check_real("--norm-decay", args.norm_decay, 0.0, 1.0, high_open=True)
    check_int("--fresh-batch", args.fresh_batch, minimum=0)
    check_real("--beta", args.beta, 0.0, 1.0, low_open=True)
    check_real("--lr-gamma", args.lr_gamma, 0.0, 1.0, low_open=True)
    for value in args.lr_milestones + args.lr_time_milestones:
        check_real("--lr-milestones/--lr-time-milestones", value, 0.0, math.inf)
    if args.eval_every is not None:
        check_real("--eval-every", args.eval_every, 0.0, math.inf, low_open=True)
    check_int("--checkpoint-every", args.checkpoint_every, minimum=0)
    if args.eval_subset is not None:
        check_int("--eval-subset", args.eval_subset)
    check_int("--flatness-batches", args.flatness_batches)
    if args.dataset == "cifar10" and not args.download and not os.path.isdir(os.path.join(args.data_dir,
                                                                                        "cifar-10-batches-py")):
        raise ValueError(f"--data-dir {args.data_dir!r} has no cifar-10-batches-py folder (or pass --download)")
    if args.mnist1d_samples is not None:
        check_int("--mnist1d-samples", args.mnist1d_samples, minimum=100)
    if args.width is not None:
        check_int("--width", args.width)
    shape, dims = data.IMAGE_SHAPES[args.dataset], models.input_dims(args.model)
    if (dims == "tokens") != (args.dataset == "pystdlib"):
        raise ValueError(f"--model {args.model} and --dataset {args.dataset} do not fit: the language model (--model "
                         "gpt) reads bytes (--dataset pystdlib), the other models images or signals")
    if dims is not None and dims != "tokens" and dims != len(shape) - 1:
        wanted = "1-D signals (--dataset mnist1d)" if dims == 1 else "images (--dataset digits, cifar10 or synthetic)"
        raise ValueError(f"--model {args.model} needs {wanted}; --dataset {args.dataset} gives inputs of shape {shape}")
    needs = models.input_size(args.model)
    if args.augment is None:
        args.augment = augment.default_for(args.dataset, needs)
    augment.check_fit(args.augment, args.dataset, data.IMAGE_SHAPES[args.dataset], args.model, needs)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available on this node")
    if args.resume is not None:
        from horovod_leader.training.checkpoint import latest_step
        if latest_step(args.resume) is None:
            raise ValueError(f"--resume {args.resume!r} holds no checkpoint (expected {args.resume}/checkpoints)")
    from horovod_leader.launcher import world_size
    from horovod_leader.topology import resolve_group_size
    resolve_group_size(args.group_size, world_size())


def validate_method_options(args, explicit=frozenset()) -> None:
    """The options that belong to some methods only: the inner optimizer, compression, DiLoCo's
    outer step and the EASGD variant. Refused, naming the option, where they do not apply."""
    from horovod_leader.validation import check_real

    if args.inner_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"--inner-optimizer {args.inner_optimizer!r} is not one of {list(INNER_OPTIMIZERS)}")
    if args.inner_optimizer == "adamw":
        for dest, option in (("momentum", "--momentum"), ("nesterov", "--nesterov/--no-nesterov")):
            if dest in explicit:
                raise ValueError(f"{option} is SGD's; --inner-optimizer adamw uses AdamW's betas (0.9, 0.999)")
        if getattr(args, "preset", None) is not None:
            raise ValueError("--preset paper sets the authors' SGD hyperparameters; it cannot be combined with "
                             "--inner-optimizer adamw")
    if args.lr is None:
        args.lr = ADAMW_LR if args.inner_optimizer == "adamw" else 0.1
    if args.compression not in ("none", "bf16", "int8"):
        raise ValueError(f"--compression {args.compression!r} is not one of ['none', 'bf16', 'int8']")
    one_sided = args.algo == "easgd" and args.easgd_variant == "one-sided"
    if args.compression != "none" and (args.algo not in compressed_algos() or one_sided):
        what = ("--easgd-variant one-sided (it sends no collectives)" if one_sided else
                f"--algo {args.algo} ({METHODS[args.algo].label})")
        raise ValueError(f"--compression {args.compression} is not available with {what}; it covers "
                         f"{list(compressed_algos())}")
    if args.easgd_variant not in EASGD_VARIANTS:
        raise ValueError(f"--easgd-variant {args.easgd_variant!r} is not one of {list(EASGD_VARIANTS)}")
    if args.easgd_variant == "one-sided":
        if args.algo != "easgd":
            raise ValueError(f"--easgd-variant one-sided is an EASGD variant: use it with --algo easgd, "
                             f"not --algo {args.algo}")
        if not args.asynchronous:
            raise ValueError("--easgd-variant one-sided is asynchronous by nature (no rounds, no collectives): "
                             "give --async too")
        if args.device == "cuda":
            raise ValueError("--easgd-variant one-sided keeps its centre in MPI windows in host memory: it needs "
                             "--device cpu (or auto, which then trains on the CPU)")
    for spec in METHODS.values():  # options that one method alone takes
        for dest in spec.only_here:
            if dest in explicit and args.algo != spec.name:
                raise ValueError(f"--{dest.replace('_', '-')} is {spec.label}'s: use it with --algo {spec.name}, not "
                                 f"--algo {args.algo}")
    check_real("--outer-lr", args.outer_lr, 0.0, math.inf, low_open=True)
    check_real("--outer-momentum", args.outer_momentum, 0.0, 1.0, high_open=True)


def make_optimizer(args, model):
    """The workers' own optimizer (``--inner-optimizer``), over ``model``'s parameters."""
    import torch

    if args.inner_optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)


def make_wrapper(args, optimizer, model, fresh_loss=None):
    """The ``--algo`` method's wrapper, from its ``MethodSpec`` (``horovod_leader.registry``)."""
    extras = {"fresh_loss": fresh_loss} if fresh_loss is not None else {}
    return METHODS[args.algo].make(args, optimizer, model, **extras)


class Trainer:
    """One run: model, optimizer wrapper, schedule and the loop. The data pipeline, the
    evaluation and the training clock live in ``horovod_leader.training``."""

    def __init__(self, args, topo, clock=None):
        import torch

        from horovod_leader import engine

        from horovod_leader.training import data, models
        from horovod_leader.training.augment import BatchAugment
        from horovod_leader.training.clock import TrainingClock
        from horovod_leader.training.evaluation import Evaluator
        from horovod_leader.training.pipeline import FreshBatchLoss, TrainPipeline

        hvd = engine.active()  # Horovod, or the torch.distributed engine (``--backend``)
        self.args, self.topo, self.hvd, self.torch = args, topo, hvd, torch
        self.rank, self.size = topo.rank, topo.size
        self.out = Path(args.resume or args.out)
        torch.manual_seed(args.seed)
        train, test, channels, classes = self.load_data()
        # The one-sided EASGD's centre lives in MPI windows in host memory: it trains on the CPU.
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and
                                             args.easgd_variant != "one-sided")
        if use_cuda:
            torch.cuda.set_device(hvd.local_rank())
        self.device = torch.device("cuda", hvd.local_rank()) if use_cuda else torch.device("cpu")
        self.pipeline = TrainPipeline(train, self.rank, self.size, args.batch_size, args.seed, args.sampling,
                                      BatchAugment(args.augment, data.black_level(args.dataset)), self.device)
        self.model = models.build(args.model, classes, channels, input_shape=train.tensors[0].shape[1:],
                                  width=args.width).to(self.device)  # before wrapping
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.inner_optimizer = make_optimizer(args, self.model)  # the workers' own optimizer (SGD or AdamW)
        self.spec = METHODS[args.algo]
        self.fresh = (FreshBatchLoss(self.pipeline, args.fresh_batch) if self.spec.fresh_loss and args.fresh_batch
                      else None)
        self.wrapper = make_wrapper(args, self.inner_optimizer, self.model, self.fresh)
        from horovod_leader.training.metrics import for_dataset

        self.evaluator = Evaluator(self.model, self.wrapper, args.algo, self.pipeline, test, topo, hvd, self.device,
                                   None if args.bn_batches == "full" else args.bn_batches, args.asynchronous,
                                   metric=for_dataset(args.dataset), eval_subset=args.eval_subset)
        self.clock = clock if clock is not None else TrainingClock()  # e.g. links.counting_clock's
        self.steps_per_epoch = self.pipeline.steps_per_epoch
        self.step = 0
        self.losses: List[float] = []

    def load_data(self):
        """Each node's local rank 0 loads first, filling the node's caches (MNIST-1D) or
        downloading (CIFAR-10), while the node's other ranks wait; then they read."""
        from horovod_leader.training import data

        args, first = self.args, self.hvd.local_rank() == 0
        load = lambda: data.load(args.dataset, args.data_dir, args.download, args.seed, samples=args.mnist1d_samples)
        loaded = load() if first else None
        self.hvd.allreduce(self.torch.zeros(1), name="train.data_ready")
        return loaded if first else load()

    def mean_loss(self) -> float:
        recent = self.losses[-20:]
        return sum(recent) / len(recent) if recent else float("nan")

    def write_config(self) -> None:
        """``config.json``: argparse's destinations with the values this run uses (rewritten on
        resume, with the budget and intervals of the new segment)."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            from horovod_leader.training.metrics import for_dataset

            extra = {"world_size": self.size, "groups": self.topo.groups, "metric": for_dataset(self.args.dataset).name}
            if self.args.dataset == "pystdlib":  # the corpus: the interpreter's version, its files and bytes
                from horovod_leader.training.data_pystdlib import metadata
                extra["dataset_metadata"] = metadata()
            (self.out / "config.json").write_text(json.dumps({**vars(self.args), **extra}, indent=2))

    def evaluates_now(self) -> bool:
        """An evaluation is due: whether to measure at once. Synchronous runs: every rank,
        together. Asynchronous runs: rank 0 alone, at once when it can read the centre by
        itself, otherwise once the snapshot it asks for now has arrived (``request_centre``)."""
        if not self.args.asynchronous:
            return True
        if self.rank != 0:
            return False
        if self.evaluator.needs_snapshot:
            self.wrapper.request_centre()
            self._awaiting_centre = True
            return False
        return True

    def evaluate(self, snapshot=None) -> Optional[float]:
        """Measure and record (rank 0 writes, with its own clock's reading), outside the training clock."""
        seconds, wall = self.clock.train_seconds(), self.clock.wall_seconds()
        with self.clock.excluded():
            if getattr(self.wrapper, "_in_flight", None) is not None:
                # an overlapped round's exchange completes first (it is still applied at its own
                # step): on the torch engine collectives on one group run in the order posted,
                # and the evaluation's all-reduces share the node's group with the round's
                self.wrapper._driver.progress(block=True)
            return self.record(self.evaluator.record(step=self.step, epoch=self.step / self.steps_per_epoch,
                                                     train_seconds=seconds, wall_seconds=wall,
                                                     mean_loss=self.mean_loss(), snapshot=snapshot))

    def state_dict(self) -> Dict:
        """What a checkpoint holds for this rank: the step, both clocks, the model, the wrapper
        (with its inner optimizer), the random state, the recent losses and how many fresh
        batches GRAWA drew."""
        import torch

        return {"step": self.step, "clock": self.clock.state_dict(), "model": self.model.state_dict(),
                "wrapper": self.wrapper.state_dict(), "torch_rng": torch.get_rng_state(),
                "losses": self.losses[-100:], "fresh_batches": self.fresh.calls if self.fresh is not None else 0}

    def load_state_dict(self, state: Dict) -> None:
        import torch

        self.model.load_state_dict(state["model"])
        self.wrapper.load_state_dict(state["wrapper"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.clock.load_state_dict(state["clock"])
        self.losses = list(state["losses"])
        if self.fresh is not None:
            self.fresh.calls = int(state["fresh_batches"])

    def save_checkpoint(self) -> None:
        from horovod_leader.training import checkpoint

        with self.clock.excluded():
            checkpoint.save(self.out, self.rank, self.size, self.step, self.state_dict(), self.hvd)

    # -------------------------------------------------------------- the loop
    def run(self) -> None:
        from horovod_leader.training import checkpoint
        from horovod_leader.training.clock import AgreedClock
        from horovod_leader.training.metrics import cross_entropy
        from horovod_leader.training.schedule import LoopSchedule

        args, torch = self.args, self.torch
        if args.resume:
            self.load_state_dict(checkpoint.load(self.out, self.rank, self.size))
        self.write_config()
        self.clock.start()
        cycle = max(self.wrapper.period, getattr(self.wrapper, "global_period", 1))  # rounds repeat after it
        agreed = AgreedClock(self.clock, self.hvd, args.asynchronous, cycle=cycle)
        seconds, _ = agreed.start()
        schedule = LoopSchedule(steps_per_epoch=self.steps_per_epoch, epochs=args.epochs, time_budget=args.time_budget,
                                eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, lr=args.lr,
                                lr_gamma=args.lr_gamma, lr_milestones=args.lr_milestones,
                                lr_time_milestones=args.lr_time_milestones, asynchronous=args.asynchronous,
                                start_seconds=seconds)
        bar = None
        if self.rank == 0 and not args.no_progress:
            from horovod_leader.training.progress import Progress
            bar = Progress(schedule.total_steps, self.step, f"{args.algo}{' async' if args.asynchronous else ''}")
        last_acc = None
        self._awaiting_centre = False  # an asynchronous evaluation waits for its snapshot of the average
        # A resumed run that already reached its budget takes no further step.
        done = schedule.done(self.step, seconds)
        skip = self.step % self.steps_per_epoch  # resuming mid-epoch: skip the batches already seen
        epoch_index = self.step // self.steps_per_epoch
        while not done:
            for x, y in self.pipeline.batches(epoch_index, skip):
                lr = schedule.lr_at(self.step, seconds)
                for group in self.inner_optimizer.param_groups:
                    group["lr"] = lr
                loss = cross_entropy(self.model(x), y)
                self.inner_optimizer.zero_grad()
                loss.backward()
                self.wrapper.step(loss)
                self.losses.append(loss.item())
                self.step += 1
                # One clock reading per step: every rank decides alike, at this step.
                seconds, _ = agreed.after_step()
                if bar is not None:
                    bar.update(1)
                    if self.step % 10 == 0:
                        bar.set_postfix(loss=f"{self.mean_loss():.3f}", leader=getattr(self.wrapper, "global_leader", "-"),
                                        **{self.evaluator.metric.name: "-" if last_acc is None else f"{last_acc:.3f}"})
                done = schedule.done(self.step, seconds)
                if schedule.evaluation_due(self.step, seconds) and not done and self.evaluates_now():
                    last_acc = self.evaluate()
                if self._awaiting_centre and not done:
                    snapshot = self.wrapper.take_centre()
                    if snapshot is not None:  # the average, taken at the round just completed
                        self._awaiting_centre = False
                        last_acc = self.evaluate(snapshot)
                if schedule.checkpoint_due(self.step):
                    self.save_checkpoint()
                if done:
                    break
            if not done:
                skip = 0
                epoch_index += 1
        agreed.finish()
        if args.asynchronous:  # the rounds that close() serves are part of the training
            self.wrapper.close()
        else:  # every rank stopped at the same step: closing is only leaving the collectives
            with self.clock.excluded():
                self.wrapper.close()
        # After close() every rank's state is final (asynchronous runs: every round served,
        # the one-sided EASGD's centre shards complete), so every run can resume from here.
        seconds, wall = self.clock.train_seconds(), self.clock.wall_seconds()
        self.save_checkpoint()
        last_acc = self.final_evaluation(seconds, wall)
        if bar is not None:
            bar.close()
        if self.rank == 0:
            print(f"done: {self.step} steps in {seconds:.1f} s of training ({self.clock.wall_seconds():.1f} s in all); "
                  f"final centre {self.evaluator.metric.name.replace('_', ' ')} "
                  f"{last_acc if last_acc is None else round(last_acc, 4)}; "
                  f"metrics in {self.out / 'metrics.jsonl'}", flush=True)

    def final_evaluation(self, seconds: float, wall: float) -> Optional[float]:
        """The last record, after every rank has closed its wrapper (collectives allowed);
        with ``--flatness`` it also holds the Hessian trace and top eigenvalue of the centre
        (and of LSGD's global leader), see ``horovod_leader.training.flatness.measure_for_run``."""
        with self.clock.excluded():
            record = self.evaluator.record(step=self.step, epoch=self.step / self.steps_per_epoch,
                                           train_seconds=seconds, wall_seconds=wall, mean_loss=self.mean_loss(),
                                           final=True)
            if self.args.time_budget is not None:
                record["time_budget"] = self.args.time_budget
            if self.args.flatness:
                from horovod_leader.training.flatness import measure_for_run

                record.update(measure_for_run(self.evaluator, self.args.flatness_batches, self.args.seed))
            return self.record(record)

    def record(self, record: Optional[Dict]) -> Optional[float]:
        if record is None:
            return None
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        keys = self.evaluator.keys
        for key in (keys["centre"], keys["worker0"]):  # the centre is every method's headline
            if record.get(key) is not None:
                return record[key]
        return None


def parse_explicit(argv: Optional[List[str]] = None):
    """(args, the destinations given on the command line). With ``--resume OUT`` the options come
    from ``OUT/config.json`` (``training.resume``); otherwise ``--preset`` fills in what the
    command line does not set explicitly."""
    from horovod_leader.training import presets, resume

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = presets.explicit_dests(parser, argv)
    if args.resume is not None:
        args = resume.restore(args, explicit, parser)
    elif args.preset is not None:
        presets.apply(args, explicit)
    return args, explicit


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``--resume`` and ``--preset`` applied); see ``parse_explicit``."""
    return parse_explicit(argv)[0]


def parse_and_validate(argv: Optional[List[str]]):
    """(args, None) or (None, error message); never exits and never communicates."""
    try:
        args, explicit = parse_explicit(argv)
        validate(args, explicit)
        return args, None
    except ValueError as error:
        return None, str(error)


def agreed_on_every_rank(error: Optional[str], prog: str = "horovod-leader-train") -> bool:
    """Whether no rank found an error in its arguments (``error``: this rank's, or None).

    Every rank checked its own arguments without communicating; one small all-gather (which
    every rank reaches, whatever its arguments; over MPI, or Horovod's collectives in Gloo
    mode) lets all of them stop together when any rank's arguments are bad: no rank is left
    waiting in a collective. Rank 0 prints the errors, naming the ranks."""
    from horovod_leader.launcher import gather_from_every_rank, world_rank

    errors = gather_from_every_rank(error, name="train.option_check")
    if not any(errors):
        return True
    if world_rank() == 0:
        ranks = [r for r, e in enumerate(errors) if e]
        for message in sorted({e for e in errors if e}):
            print(f"{prog}: error (ranks {ranks}): {message}", file=sys.stderr, flush=True)
    return False


def main(argv: Optional[List[str]] = None) -> int:
    args, error = parse_and_validate(argv)
    if not agreed_on_every_rank(error):
        return 2
    import horovod_leader as hl

    topo = hl.init(group_size=args.group_size, backend=args.backend)
    hvd = hl.engine.active()
    if args.resume is not None:
        from horovod_leader.training import resume
        try:  # the same files and groups on every rank: every rank decides alike
            resume.check_groups(resume.saved_config(args.resume).get("groups"), topo.groups)
        except ValueError as error:
            if topo.rank == 0:
                print(f"horovod-leader-train: error: {error}", file=sys.stderr, flush=True)
            hvd.shutdown()
            return 2
    Trainer(args, topo).run()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
