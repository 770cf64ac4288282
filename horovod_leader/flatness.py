"""The Hessian tools under their first name (``horovod_leader.hessian``), and ``--flatness``'s
measurement of a run (``horovod_leader.training.flatness``)."""
from horovod_leader.hessian import cross_entropy_loss, fixed_training_batches, hessian_trace, hutchinson_values, top_eigenvalue
from horovod_leader.training.flatness import measure_for_run

__all__ = ["hessian_trace", "hutchinson_values", "top_eigenvalue", "fixed_training_batches", "cross_entropy_loss",
           "measure_for_run"]
