"""Leader election: who is the best worker, in a group and overall.

Every worker keeps a score: the mean of its last ``window`` minibatch losses (the paper uses
the current loss, the authors' code a running mean; a window of 1 is the paper's rule). At a
refresh the scores of all workers are gathered (one small all-gather) and every rank computes
the leaders itself with the same deterministic rule, so no second round is needed:

* the leader is the worker with the lowest score among the candidates;
* a non-finite score (NaN, +-inf) never wins;
* ties go to the lowest rank.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Deque, Dict, Iterable, List, Optional, Sequence

import torch


class ScoreWindow:
    """Running mean of the last ``window`` losses of this worker.

    Losses are kept as given (0-d tensors stay on their device), so recording a loss never
    forces a device synchronisation; the mean is taken only when a refresh needs it.
    """

    def __init__(self, window: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"score_window must be an integer >= 1, got {window!r}")
        self.window = window
        self._losses: Deque = deque(maxlen=window)

    def record(self, loss) -> None:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar (0-d tensor or float), got a tensor of shape {tuple(loss.shape)}")
            loss = loss.detach().reshape(())
        else:
            loss = float(loss)
        self._losses.append(loss)

    def score(self) -> float:
        """Mean of the recorded losses; +inf when there are none (such a worker cannot lead)."""
        if not self._losses:
            return math.inf
        values = [v.double().cpu() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)
                  for v in self._losses]
        return float(torch.stack(values).mean())

    def state_dict(self) -> Dict:
        return {"window": self.window, "losses": [float(v) for v in self._losses]}

    def load_state_dict(self, state: Dict) -> None:
        self._losses = deque((float(v) for v in state["losses"]), maxlen=self.window)


def elect(scores: Sequence[float], candidates: Iterable[int]) -> Optional[int]:
    """Rank with the lowest finite score among ``candidates``; ties to the lowest rank.

    Returns None when no candidate has a finite score (nobody can lead this round).
    """
    best: Optional[int] = None
    for rank in sorted(candidates):
        score = float(scores[rank])
        if not math.isfinite(score):
            continue
        if best is None or score < float(scores[best]):
            best = rank
    return best


def elect_all(scores: Sequence[float], groups: Sequence[Sequence[int]]) -> tuple:
    """Leaders of every group and the global leader from one vector of all ranks' scores."""
    group_leaders: List[Optional[int]] = [elect(scores, ranks) for ranks in groups]
    global_leader = elect(scores, range(len(scores)))
    return group_leaders, global_leader
