r"""GRAWA weights: how much each worker counts in the centre, from its gradient norms.

.. math::

    w_i = \frac{1/\|g_i\|}{\sum_j 1/\|g_j\|}, \qquad
    x_C = \sum_i w_i\,x_i = \frac{\sum_i x_i/\|g_i\|}{\sum_j 1/\|g_j\|}

so that workers in flat regions (small gradients) count more. One weight per worker for
MGRAWA (the true L2 norm of the whole gradient), one per worker and parameter tensor for
LGRAWA. The right-hand form is what travels: each worker sends :math:`x_i/\|g_i\|` and
:math:`1/\|g_i\|` in the *same* all-reduce, and divides afterwards, so a round is one set of
collectives posted together (no second exchange that waits for the first).

Edge cases, decided the same way on every rank:

* a zero norm is clamped to ``MIN_NORM``, so its weight is large but finite;
* an unhealthy worker (a non-finite norm, or non-finite parameters or buffers) sends zeros
  and a zero health flag: it does not count at all;
* when no worker is healthy, there is no centre (the wrapper raises ``AllWorkersDiverged``).

This module holds the arithmetic on both sides of the all-reduce, so it can be tested without MPI.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

MIN_NORM = 1e-12


def norms_of(grads: Sequence[Optional[torch.Tensor]], layerwise: bool) -> torch.Tensor:
    """Per-tensor L2 norms of ``grads`` (0 for None), or their joint L2 norm, in float64
    whatever the gradients' dtype. A sparse gradient is coalesced first (its repeated indices
    summed), so its norm is that of the dense gradient it stands for."""
    def norm(g):
        if g is None:
            return torch.zeros((), dtype=torch.float64)
        g = g.detach()
        if g.is_sparse:
            g = g.coalesce().values()
        return g.double().norm().cpu()

    norms = torch.stack([norm(g) for g in grads]) if grads else torch.zeros(0, dtype=torch.float64)
    if layerwise:
        return norms
    return norms.pow(2).sum().sqrt().reshape(1)


def grad_norms(tensors: List[torch.Tensor], layerwise: bool) -> torch.Tensor:
    """The norms of the tensors' ``.grad`` (see ``norms_of``)."""
    return norms_of([t.grad for t in tensors], layerwise)


def local_terms(norms: torch.Tensor, healthy: bool = True) -> torch.Tensor:
    """This worker's contribution to the all-reduce of the norms: ``[1/norm ...; health flag]``.

    An unhealthy worker, or one with a non-finite norm, contributes zeros and flag 0.
    """
    healthy = bool(healthy) and bool(torch.isfinite(norms).all())
    inverse = 1.0 / norms.clamp_min(MIN_NORM) if healthy else torch.zeros_like(norms)
    return torch.cat([inverse, torch.tensor([1.0 if healthy else 0.0], dtype=torch.float64)])


def contributes(terms: torch.Tensor) -> bool:
    return bool(terms[-1] > 0)


def inverse_norms(terms: torch.Tensor) -> torch.Tensor:
    """The weights before normalisation (the ``1/norm`` part of ``local_terms``)."""
    return terms[:-1]


def healthy_count(summed: torch.Tensor) -> int:
    """How many workers contributed, from the all-reduced terms."""
    return int(round(float(summed[-1])))


def weights_from_sums(mine: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
    """This worker's normalised weights (one per norm) from its terms and their sum over workers."""
    return inverse_norms(mine) / inverse_norms(summed).clamp_min(torch.finfo(torch.float64).tiny)


class NormSmoother:
    """Bias-corrected exponential average of the norms across rounds (the authors' code).

    ``decay = 0`` disables it. Non-finite norms are passed through, not folded in.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.average: Optional[torch.Tensor] = None
        self.count = 0

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        if self.decay == 0.0 or not bool(torch.isfinite(norms).all()):
            return norms
        if self.average is None:
            self.average = torch.zeros_like(norms)
        self.average = self.decay * self.average + (1.0 - self.decay) * norms
        self.count += 1
        return self.average / (1.0 - self.decay ** self.count)

    def state_dict(self) -> dict:
        return {"average": self.average, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.average, self.count = state["average"], int(state["count"])
