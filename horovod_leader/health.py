r"""What counts as divergence: values that *training* made non-finite.

A worker is unhealthy when its loss, gradient norm, parameters or floating buffers are not
finite, with one exception: a floating buffer may hold non-finite values that were there when
the wrapper was built (an additive attention mask of ``-inf``, a running maximum that starts
at ``-inf``). Those positions are remembered with their values; as long as a position still
holds the value it started with, it is not divergence. A batch-norm statistic that *became*
NaN, or a masked position whose ``-inf`` turned into NaN, still is.

Arithmetic on such buffers needs care too: pulling :math:`x = -\infty` toward a leader's
:math:`-\infty` computes :math:`-\infty - (-\infty)` = NaN. ``pull_keeping_constants_`` keeps
every remembered position whose value the worker and the leaders agree on. Averages need no
care: the sum of equal infinities is that infinity.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch


def same_value(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise: equal, or both NaN."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


class NonFiniteAtStart:
    """The non-finite positions of some named flat tensors at construction, and their values.

    Args:
        tensors: ``(name, flat tensor)`` pairs, floating point; those holding only finite
            values are not remembered (and cost nothing later).
    """

    def __init__(self, tensors: Iterable[Tuple[str, torch.Tensor]]):
        self.positions: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        for name, tensor in tensors:
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                index = bad.nonzero().reshape(-1)
                self.positions[name] = (index, tensor[index].clone())

    def finite(self, name: str, tensor: torch.Tensor) -> bool:
        """True when every value of ``tensor`` is finite, or non-finite only where it was at
        construction and with the value it had then."""
        ok = torch.isfinite(tensor)
        if bool(ok.all()):
            return True
        known = self.positions.get(name)
        if known is None:
            return False
        index, values = known
        ok[index] |= same_value(tensor[index], values)
        return bool(ok.all())

    def pull_keeping_constants_(self, name: str, tensor: torch.Tensor, local: Optional[torch.Tensor],
                                glob: Optional[torch.Tensor], local_pull: float, global_pull: float,
                                anchor: Optional[torch.Tensor] = None) -> None:
        """``x -= a (y - L) + b (y - G)`` with y = ``anchor`` (default x; ``fused.leader_pull_``),
        except at the remembered positions where y and every leader it is pulled toward hold
        the same value: those keep x's value."""
        from horovod_leader import fused

        known = self.positions.get(name)
        if known is None:
            fused.leader_pull_(tensor, local, glob, local_pull=local_pull, global_pull=global_pull, anchor=anchor)
            return
        index = known[0]
        before = tensor[index].clone()
        reference = before if anchor is None else anchor[index]
        agree = torch.ones_like(before, dtype=torch.bool)
        for leader, pull in ((local, local_pull), (glob, global_pull)):
            if leader is not None and pull != 0.0:
                agree &= same_value(leader[index], reference)
        fused.leader_pull_(tensor, local, glob, local_pull=local_pull, global_pull=global_pull, anchor=anchor)
        tensor[index] = torch.where(agree, before, tensor[index])
