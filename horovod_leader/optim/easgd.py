r"""EASGD: elastic averaging with a centre variable replicated on every rank."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from horovod_leader.compression import Codec, check_compression, name_of
from horovod_leader.optim.averaging import MeanRound, post_weighted_sum
from horovod_leader.optim.base import DistributedWrapper, _refuse_overlap_with_async
from horovod_leader.validation import check_bool, check_real


class EASGD(DistributedWrapper):
    r"""Synchronous (or asynchronous) elastic averaging SGD (Zhang et al., 2015).

    Every worker steps on its own. At the k-th ``step`` with ``period`` dividing k, after the
    optimizer's step, with the values before this exchange:

    .. math::

        x_i \leftarrow x_i - \alpha\,(x_i - \tilde x), \qquad
        \tilde x \leftarrow (1-\beta)\,\tilde x + \beta\,\frac1p\sum_i x_i

    Floating buffers (batch-norm statistics) are replaced by the workers' mean in each round.
    The centre :math:`\tilde x` is replicated identically on every rank: it starts as the
    average of the workers at construction and is part of ``state_dict``. One all-reduce of the
    packed parameters per round. ``alpha`` defaults to ``beta / size``; both lie in (0, 1]
    (typical: ``beta = 0.9``, or 0.43 in the LSGD authors' code). A diverged worker (non-finite
    parameters or floating buffers) does not enter the mean and is reset to the new centre;
    when no worker is healthy, every rank raises ``AllWorkersDiverged``.

    ``asynchronous=True`` is the *round-based* asynchronous EASGD of the LSGD authors' code, the
    baseline of the LSGD and GRAWA papers: rounds are scheduled on the global step count (every
    ``size * period`` steps of all workers together) and run while the workers keep stepping;
    the elastic pull acts on the worker's current parameters when the mean arrives. The EASGD
    paper's own asynchronous algorithm, with no rounds and no collectives (a sharded centre in
    MPI windows), is ``OneSidedEASGD``.

    ``compression="bf16"``/``"int8"``: each worker sends its difference from the centre,
    compressed, in an all-gather (``horovod_leader.compression``).

    ``overlap=d`` (synchronous only): the round posted at step k is applied at step k + d,
    its pull computed from what this worker sent at step k (``_apply``).
    """

    name = "easgd"
    _uses_node_sets = True
    DEFAULT_PERIOD = 4
    DEFAULT_BETA = 0.9  # the EASGD paper's; the LSGD authors' code uses 0.43 (``--preset paper``)

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = DEFAULT_PERIOD,
                 beta: float = DEFAULT_BETA, alpha: Optional[float] = None, *, asynchronous: bool = False,
                 compression: Optional[str | Codec] = None, broadcast_buffers: bool = True, overlap: int = 0,
                 topology=None):
        self.beta = check_real("beta", beta, 0.0, 1.0, low_open=True)
        if alpha is not None:
            check_real("alpha", alpha, 0.0, 1.0, low_open=True)
        self._alpha_given = None if alpha is None else float(alpha)
        self._asynchronous_given = check_bool("asynchronous", asynchronous)
        self.compression = check_compression(compression)
        _refuse_overlap_with_async(overlap, asynchronous)
        super().__init__(optimizer, model, period=period, topology=topology, broadcast_buffers=broadcast_buffers,
                         overlap=overlap)
        self.alpha = self.beta / self.size if alpha is None else float(alpha)
        self._mean = MeanRound(self.compression)
        self._centre: Dict[Any, torch.Tensor] = {}  # x~, replicated alike on every rank
        for handle in post_weighted_sum(self.comm, self.params, self._centre, torch.tensor([1.0 / self.size]), True,
                                        "init"):
            self.comm.wait(handle)
        self._setup_rounds(asynchronous, self.period)

    def _settings(self) -> Dict[str, Any]:
        return {**super()._settings(), "period": self.period, "beta": self.beta, "alpha": self._alpha_given,
                "asynchronous": self._asynchronous_given, "compression": name_of(self.compression)}

    def centre(self) -> Dict[Any, torch.Tensor]:
        r"""The centre variable :math:`\tilde x`, replicated alike on every rank (float32 for a
        half-precision model)."""
        return self._centre

    def step(self, loss=None) -> None:
        """One step of the wrapped optimizer; every ``period`` steps, the elastic round."""
        self._step_then_round(loss)

    def _round(self, number: int, joined: bool = False):
        """One elastic round; ``joined``: this rank has closed, adds nothing and is not pulled,
        but keeps its replica of the centre up to date."""
        outcome = yield from self._average(self._mean, number, joined, refs=self._centre, what="elastic round")
        yield from self._hold(outcome)
        self._apply(outcome)

    def _apply(self, outcome) -> None:
        r"""The elastic pull toward the centre before its update, then the centre's update
        toward the mean. Overlapped by d steps, the pull is computed from what this worker sent,
        :math:`s = x_k`, and applied at step k + d: :math:`x \leftarrow x - \alpha (s - \tilde x)`."""
        reset = self._apply_mean(outcome) and not outcome["joined"]
        if not outcome["joined"] and not reset:  # the elastic pull uses the centre before its own update
            self._correct_(self.params, self._centre, self.alpha)
        with torch.no_grad():
            for key, centre in self._centre.items():
                centre.mul_(1.0 - self.beta).add_(outcome["params"][key], alpha=self.beta)
        if outcome["joined"]:
            return
        if reset:
            self._correct_(self.params, self._centre, 1.0, reset=True)
        self._correct_(self.float_buffers, outcome["buffers"], 1.0, which="buffers", reset=reset)
        if reset:
            self._log_recovery("the EASGD centre")

    _required_state = ("centre",)

    def _state(self) -> Dict[str, Any]:
        return {"centre": self._named(self._centre)}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._restore_named(state["centre"], self.params, "centre", self._centre)
