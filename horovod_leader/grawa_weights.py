r"""GRAWA weights: how much each worker counts in the centre, from its gradient norms.

.. math::

    w_i = \frac{1/\|g_i\|}{\sum_j 1/\|g_j\|}

so that workers in flat regions (small gradients) count more. One weight per worker for
MGRAWA (the true L2 norm of the whole gradient), one per worker and parameter tensor for
LGRAWA. Edge cases, decided the same way on every rank:

* a zero norm is clamped to ``MIN_NORM`` so its weight is large but finite;
* a non-finite norm gets weight 0 (the worker is pulled but does not contribute);
* if no worker has a finite norm, every worker gets the equal weight 1/p.

The sums over workers come from one all-reduce of ``[inverse norms; finite flags]``; this
module holds the arithmetic on both sides of it, so it can be tested without MPI.
"""
from __future__ import annotations

from typing import List, Optional

import torch

MIN_NORM = 1e-12


def grad_norms(tensors: List[torch.Tensor], layerwise: bool) -> torch.Tensor:
    """Per-tensor L2 norms of the tensors' ``.grad`` (0 for None), or their joint L2 norm."""
    grads = [t.grad for t in tensors]
    norms = torch.stack([g.detach().double().norm() if g is not None else torch.zeros((), dtype=torch.float64)
                         for g in grads]).cpu() if grads else torch.zeros(0, dtype=torch.float64)
    if layerwise:
        return norms
    return norms.pow(2).sum().sqrt().reshape(1)


def local_terms(norms: torch.Tensor, healthy: bool = True) -> torch.Tensor:
    """This worker's contribution to the all-reduce: rows [1/norm, finite flag], float64.

    An unhealthy worker (non-finite parameters) contributes nothing at all.
    """
    finite = torch.isfinite(norms) & torch.tensor(bool(healthy))
    inverse = torch.where(finite, 1.0 / norms.clamp_min(MIN_NORM).nan_to_num(posinf=1.0), torch.zeros_like(norms))
    return torch.stack([inverse, finite.double()])


def weights_from_sums(mine: torch.Tensor, summed: torch.Tensor, size: int) -> torch.Tensor:
    """This worker's weights (one per norm) from its own terms and their sum over workers."""
    inverse, _ = mine
    total_inverse, finite_count = summed
    equal = torch.full_like(inverse, 1.0 / size)
    return torch.where(finite_count > 0, inverse / total_inverse.clamp_min(torch.finfo(torch.float64).tiny), equal)


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
