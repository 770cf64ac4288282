"""Errors that every rank raises together, so that a job stops instead of hanging."""
from __future__ import annotations


class AllWorkersDiverged(RuntimeError):
    """No worker has a finite loss, gradient, parameters and floating buffers in a round.

    Every rank takes part in the round and sees the same gathered health flags, so every rank
    raises this error in the same round: there is no sound worker left to reset the others to,
    and resetting to zeros or to a shrunken centre would only hide the failure.
    """

    def __init__(self, method: str, step: int, detail: str = ""):
        self.method = method
        self.step = step
        where = f"at step {step}" + (f" ({detail})" if detail else "")
        super().__init__(
            f"{method}: every worker diverged {where}: no worker has a finite loss, gradient, parameters and "
            "buffers, so there is nothing sound to continue from. Try a lower learning rate (or gradient "
            "clipping), or resume from an earlier checkpoint.")
