"""The training loop's cadences in one place: learning rate, budget, evaluations, checkpoints.

Every decision is a function of the step count and one clock reading per step (in
synchronous runs the ``AgreedClock`` estimate of rank 0's training clock, the same on every
rank), so every rank takes it at the same step, whatever the method or its period:

* the run is **done** at the first step whose clock is past ``--time-budget`` (or at the last
  step of ``--epochs``);
* an **evaluation** is due at the first step past each multiple of ``--eval-every`` seconds
  (default a tenth of the budget; without a budget, every tenth of the steps);
* the **learning rate** drops by ``--lr-gamma`` at each epoch of ``--lr-milestones`` and each
  second of ``--lr-time-milestones`` that has passed;
* a **checkpoint** is due every ``--checkpoint-every`` steps (synchronous runs; an
  asynchronous run writes one at the end).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence


class LoopSchedule:
    """Args:
        steps_per_epoch: steps in one epoch of this rank's slice.
        epochs: stop after this many epochs (None: no limit).
        time_budget: stop after this many seconds of training (None: no limit).
        eval_every: seconds between evaluations (None: a tenth of the budget, or by steps).
        checkpoint_every: steps between checkpoints (0: only at the end).
        lr, lr_gamma, lr_milestones, lr_time_milestones: the learning-rate schedule.
        asynchronous: no checkpoints before the end (ranks are at different steps).
        start_seconds: the clock when the loop starts (a resumed run's earlier segments).
    """

    def __init__(self, *, steps_per_epoch: int, epochs: Optional[float], time_budget: Optional[float],
                 eval_every: Optional[float], checkpoint_every: int, lr: float, lr_gamma: float = 0.1,
                 lr_milestones: Sequence[float] = (), lr_time_milestones: Sequence[float] = (),
                 asynchronous: bool = False, start_seconds: float = 0.0):
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = None if epochs is None else int(epochs * steps_per_epoch)
        self.time_budget = time_budget
        self.eval_every = eval_every or (time_budget / 10 if time_budget else None)
        self.eval_every_steps = None if self.eval_every else max((self.total_steps or 100) // 10, 1)
        self.next_eval = (math.floor(start_seconds / self.eval_every) + 1) * self.eval_every if self.eval_every else None
        self.checkpoint_every = checkpoint_every
        self.lr, self.lr_gamma = lr, lr_gamma
        self.lr_milestones, self.lr_time_milestones = list(lr_milestones), list(lr_time_milestones)
        self.asynchronous = asynchronous

    def lr_at(self, step: int, seconds: float) -> float:
        epoch = step / self.steps_per_epoch
        drops = sum(epoch >= m for m in self.lr_milestones) + sum(seconds >= m for m in self.lr_time_milestones)
        return self.lr * self.lr_gamma ** drops

    def done(self, step: int, seconds: float) -> bool:
        return ((self.total_steps is not None and step >= self.total_steps)
                or (self.time_budget is not None and seconds >= self.time_budget))

    def evaluation_due(self, step: int, seconds: float) -> bool:
        """Whether to evaluate after ``step``; moves the next due time past ``seconds``."""
        if self.eval_every_steps is not None:
            return step % self.eval_every_steps == 0
        if seconds < self.next_eval:
            return False
        while self.next_eval <= seconds:
            self.next_eval += self.eval_every
        return True

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and not self.asynchronous
