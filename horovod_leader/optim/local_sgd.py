"""Local SGD (periodic model averaging): every ``period`` steps, replace every worker by the mean."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from horovod_leader.compression import Codec, check_compression, name_of
from horovod_leader.optim.averaging import MeanRound
from horovod_leader.optim.base import DistributedWrapper


class LocalSGD(DistributedWrapper):
    r"""Local SGD, or periodic model averaging (the baseline of the LSGD and GRAWA papers).

    Every worker steps on its own; at the k-th ``step`` with ``period`` dividing k, after the
    optimizer's step, every worker is replaced by the plain average
    :math:`\bar x = \frac1p \sum_i x_i` (and floating buffers by theirs).

    One all-reduce of the packed parameters per round (with a one-number count of the healthy
    workers, those whose parameters and floating buffers are finite: a diverged worker
    contributes nothing and is reset). When no worker is healthy, every rank raises
    ``AllWorkersDiverged``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters.
        model: the model (see ``DistributedWrapper``).
        period: :math:`\tau`, steps between averages (default ``DEFAULT_PERIOD`` = 4).
        compression: ``None``, ``"bf16"`` or ``"int8"``: each worker sends its difference from
            the last average, compressed, in an all-gather (``horovod_leader.compression``).
        broadcast_buffers: average the floating buffers too (batch-norm statistics).
        overlap: d, an integer in [0, ``period``): a round posted at step k is applied at step
            k + d on every rank, its correction computed from what this worker sent at step k
            (``_apply``), while the exchange crosses the links; 0: at once (the published
            method).
        topology: a ``Topology`` from ``horovod_leader.init``; default: the current one.

    Example::

        opt = hl.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), model, period=16)
        loss.backward(); opt.step(loss)
    """

    name = "localsgd"
    _uses_node_sets = True
    DEFAULT_PERIOD = 4

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = DEFAULT_PERIOD, *,
                 compression: Optional[str | Codec] = None, broadcast_buffers: bool = True, overlap: int = 0,
                 topology=None):
        self.compression = check_compression(compression)
        super().__init__(optimizer, model, period=period, topology=topology, broadcast_buffers=broadcast_buffers,
                         overlap=overlap)
        self._mean = MeanRound(self.compression)
        self._last_average: Dict = {}  # the reference of compressed rounds: the same on every rank
        self._setup_rounds(False, self.period)

    def _settings(self) -> Dict[str, Any]:
        return {**super()._settings(), "period": self.period, "compression": name_of(self.compression)}

    def step(self, loss=None) -> None:
        """One step of the wrapped optimizer; every ``period`` steps, the averaging round."""
        self._step_then_round(loss)

    def _round(self, number: int, joined: bool = False):
        """One averaging round; ``joined``: this rank has closed and only takes part."""
        outcome = yield from self._average(self._mean, number, joined, refs=self._last_average)
        yield from self._hold(outcome)
        self._apply(outcome)

    def _apply(self, outcome) -> None:
        r"""Every worker to the mean: :math:`x \leftarrow \bar x`; overlapped by d steps,
        :math:`x_{k+d} \leftarrow \bar s + (x_{k+d} - s)` with :math:`s = x_k` what this
        worker sent and :math:`\bar s` the mean of what all sent (Overlap Local-SGD, Wang,
        Liang and Joshi 2020, arXiv 2002.09539; delayed averaging, DaSGD, arXiv 2006.00441):
        the steps taken while the exchange was in flight are kept."""
        reset = self._apply_mean(outcome)
        if self.compression:
            self._last_average = {key: mean.clone() for key, mean in outcome["params"].items()}
        if outcome["joined"]:
            return
        self._correct_(self.params, outcome["params"], 1.0, reset=reset)
        self._correct_(self.float_buffers, outcome["buffers"], 1.0, which="buffers", reset=reset)
        if reset:
            self._log_recovery("the average of the healthy workers")

    def _state(self) -> Dict[str, Any]:
        # the reference of compressed rounds: without it a resumed run would send whole weights
        return {"last_average": self._named(self._last_average)}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._last_average = {}
        self._restore_named(state.get("last_average") or {}, self.params, "last_average", self._last_average)
