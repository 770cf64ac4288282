"""The methods, one ``MethodSpec`` each: everything the training command, its evaluation and
report, the presets and the benchmarks know about a method lives here, once.

A new method is one wrapper class (``horovod_leader.optim``) and one ``register(...)`` here;
``docs/architecture.md`` walks through one. Each default has one home: the wrapper class
holds its defaults as named constants (``LSGD.DEFAULT_PERIOD``, ...), and the spec reads them.
Where the training command's default differs on purpose (LSGD's ``--global-period``,
DiLoCo's ``--period``), the class names the command's value and says why.

Example::

    from horovod_leader.registry import METHODS
    spec = METHODS["lsgd"]
    spec.wrapper, spec.asynchronous, spec.compression, spec.period   # LSGD, True, True, 4
    opt = spec.make(args, optimizer, model)                          # from parsed options
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

from horovod_leader.optim import EASGD, GRAWA, LSGD, DataParallel, DiLoCo, LocalSGD, OneSidedEASGD
from horovod_leader.optim.base import DistributedWrapper

#: (argparse destination, value, where the authors' code or paper sets it)
PaperSetting = Tuple[str, Any, str]
#: bytes per worker per step the method must send, from its definition: f(options, P, tensors)
BytesFormula = Callable[[Mapping[str, Any], int, int], float]


@dataclass(frozen=True)
class MethodSpec:
    """One method, as the application sees it.

    Args:
        name: the ``--algo`` name.
        wrapper: the wrapper class.
        label: the method's name in tables and plots.
        summary: one line: what it does (the help text and the README's table of methods).
        options: the training command's options (argparse destinations) that go to the
            wrapper's constructor under the same names.
        fixed: constructor arguments the method fixes (``layerwise=True`` for LGRAWA).
        asynchronous: offers ``--async``.
        compression: offers ``--compression``.
        period: the training command's default ``--period`` (None: no period).
        cli_defaults: options whose training-command default depends on others: dest ->
            f(args), applied when the option was not given.
        centre: what its centre is called (the report's ``curve of``).
        leader: it elects a global leader, whose accuracy is recorded beside the centre's.
        fresh_loss: it takes ``--fresh-batch`` (GRAWA's fresh gradient at each average).
        only_here: options refused, naming them, when given for another method.
        paper: ``--preset paper``'s settings for this method.
        expected_bytes: bytes per worker per step from the definition (the communication
            benchmark's check), or None.
        build: a constructor of its own, ``build(spec, args, optimizer, model, **extras)``,
            where the options alone do not say which class or arguments.
    """

    name: str
    wrapper: Type[DistributedWrapper]
    label: str
    summary: str
    options: Tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    asynchronous: bool = False
    compression: bool = False
    period: Optional[int] = None
    cli_defaults: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    centre: str = "centre (workers' average)"
    leader: bool = False
    fresh_loss: bool = False
    only_here: Tuple[str, ...] = ()
    paper: Tuple[PaperSetting, ...] = ()
    expected_bytes: Optional[BytesFormula] = None
    build: Optional[Callable[..., DistributedWrapper]] = None

    def kwargs(self, args) -> Dict[str, Any]:
        """The wrapper's constructor arguments from parsed options."""
        out = {dest: getattr(args, dest) for dest in self.options}
        out.update(self.fixed)
        if self.asynchronous:
            out["asynchronous"] = bool(args.asynchronous)
        if self.compression:
            out["compression"] = None if args.compression == "none" else args.compression
        return out

    def make(self, args, optimizer, model, **extras) -> DistributedWrapper:
        """The wrapper for parsed options ``args`` (``extras``: ``fresh_loss``, ``topology``)."""
        if self.build is not None:
            return self.build(self, args, optimizer, model, **extras)
        return self.wrapper(optimizer, model, **self.kwargs(args), **extras)


METHODS: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; its name becomes an ``--algo`` choice."""
    if spec.name in METHODS:
        raise ValueError(f"a method named {spec.name!r} is registered already")
    METHODS[spec.name] = spec
    return spec


def get(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {list(METHODS)}") from None


# ---------------------------------------------------------------------------- the methods
def _lsgd_bytes(opts, payload, tensors):
    global_period = int(opts["--global-period"])
    if opts["--group-size"] == "4":  # one group: the global leader only
        return (payload + 32) / global_period  # leader's parameters + a 4-number float64 row
    period = int(opts["--period"])
    return payload / period + payload / global_period + 32 / period


def _average_bytes(extra: Callable[[int], int]) -> BytesFormula:
    # The averaging methods announce each round with one float64 (for ranks that closed early).
    return lambda opts, payload, tensors: (payload + extra(tensors) + 8) / int(opts["--period"])


def _build_easgd(spec, args, optimizer, model, **extras):
    """EASGD in rounds, or the EASGD paper's one-sided EASGD (``--easgd-variant one-sided``)."""
    if getattr(args, "easgd_variant", "rounds") == "one-sided":
        return OneSidedEASGD(optimizer, model, period=args.period, beta=args.beta, **extras)
    return EASGD(optimizer, model, **spec.kwargs(args), **extras)


def _build_diloco(spec, args, optimizer, model, **extras):
    # The paper's Nesterov outer step; with --outer-momentum 0 it is plain SGD on the pseudo-gradient.
    return DiLoCo(optimizer, model, **spec.kwargs(args), nesterov=args.outer_momentum > 0, **extras)


_GRAWA_PAPER = (
    ("period", 32, "GRAWA paper and code (tau = 32)"),
    ("pull", 0.5, "GRAWA paper and code (lambda = 0.5)"),
    ("prox", 0.01, "GRAWA code (proximal pull 0.01)"),
    ("norm_decay", 0.9 ** 8, "GRAWA code (norms smoothed by 0.9^8, bias-corrected)"),
    ("fresh_batch", 128, "GRAWA code (fresh gradient on 128 random training samples)"),
)
_GRAWA = dict(wrapper=GRAWA, options=("period", "pull", "prox", "norm_decay", "overlap"), asynchronous=True, compression=True,
              period=GRAWA.DEFAULT_PERIOD, fresh_loss=True, paper=_GRAWA_PAPER)

register(MethodSpec(
    "lsgd", LSGD, "LSGD", "every worker pulled toward the best worker of its node and of all nodes",
    options=("period", "global_period", "local_pull", "global_pull", "prox", "score_window", "overlap"),
    asynchronous=True, compression=True, period=LSGD.DEFAULT_PERIOD, leader=True,
    cli_defaults={"global_period": lambda args: LSGD.CLI_GLOBAL_PERIOD_FACTOR * args.period,
                  "score_window": lambda args: args.period},
    paper=(("period", 4, "LSGD code train.sh (l_comm = g_comm / 4)"),
           ("global_period", 16, "LSGD code train.sh (g_comm in 4 16 64)"),
           ("local_pull", 0.1, "LSGD code train.sh (c1=0.1)"),
           ("global_pull", 0.1, "LSGD code train.sh (c2=0.1)"),
           ("prox", 0.1, "LSGD code train.sh (p1=p2=0.1)"),
           ("score_window", 10, "LSGD paper text; LSGD code options.py (--avg_size 10)")),
    expected_bytes=_lsgd_bytes))
register(MethodSpec(
    "mgrawa", label="MGRAWA", summary="pulled toward the workers' average weighted by inverse gradient norms",
    expected_bytes=_average_bytes(lambda tensors: 16), **_GRAWA))
register(MethodSpec(
    "lgrawa", label="LGRAWA", summary="as MGRAWA, with a weight per worker and per layer", fixed={"layerwise": True},
    expected_bytes=_average_bytes(lambda tensors: 8 * (tensors + 1)), **_GRAWA))
register(MethodSpec(
    "easgd", EASGD, "EASGD", "elastic averaging: workers and a centre variable pulled toward each other",
    options=("period", "beta", "overlap"), asynchronous=True, compression=True, period=EASGD.DEFAULT_PERIOD,
    centre="EASGD centre", build=_build_easgd,
    # EASGD and local SGD at LSGD's tau_G: the authors' grid runs EASGD with comm = g_comm.
    paper=(("period", 16, "LSGD code train.sh (EASGD l_comm = g_comm)"),
           ("beta", 0.43, "LSGD code train.sh (EASGD c2=0.43; worker_dist_optim.py beta = c2)")),
    expected_bytes=_average_bytes(lambda tensors: 8)))
register(MethodSpec(
    "localsgd", LocalSGD, "local SGD", "every worker replaced by the workers' average every period",
    options=("period", "overlap"), compression=True, period=LocalSGD.DEFAULT_PERIOD,
    paper=(("period", 16, "LSGD code train.sh (EASGD l_comm = g_comm; local SGD alike)"),),
    expected_bytes=_average_bytes(lambda tensors: 8)))
register(MethodSpec(
    "diloco", DiLoCo, "DiLoCo", "inner steps, then an outer Nesterov step on the averaged pseudo-gradient",
    options=("period", "outer_lr", "outer_momentum", "overlap"), compression=True, period=DiLoCo.CLI_PERIOD,
    centre="outer parameters", only_here=("outer_lr", "outer_momentum"), build=_build_diloco))
register(MethodSpec(
    "dp", DataParallel, "data-parallel SGD", "Horovod's gradient all-reduce at every step", period=1,
    expected_bytes=lambda opts, payload, tensors: float(payload)))
