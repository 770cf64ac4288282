"""``--flatness``: the Hessian trace and top eigenvalue of a run's centre (and LSGD's
leader) at its end, with the library's ``horovod_leader.hessian`` tools."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from horovod_leader.hessian import cross_entropy_loss, fixed_training_batches, hessian_trace, top_eigenvalue


def measure_for_run(evaluator, count: int, seed: int, samples: int = 100, iters: int = 50) -> Dict[str, float]:
    """``--flatness``: trace and top eigenvalue at the end of a run, on every rank together.

    Measured on the first ``count`` training batches (``fixed_training_batches``, test
    transform) with the training loss (cross-entropy), spread over all ranks:

    * the centre, as the run's evaluation defines it (``evaluator.centre``: the workers'
      average, or the method's own centre where it keeps one, such as EASGD's centre
      variable; batch-norm statistics re-estimated): ``hessian_trace``,
      ``hessian_top_eigenvalue``;
    * for LSGD, the global leader's own model (parameters and batch-norm statistics
      broadcast from its rank, ``flatness.leader.<i>``): ``leader_hessian_trace``,
      ``leader_hessian_top_eigenvalue``.

    Every rank must call it at the same point (after the wrappers are closed); every rank
    gets the same dict, for the final metrics record."""
    from horovod_leader import engine
    hvd = engine.active()

    world, rank, size = hvd.global_process_set, hvd.rank(), hvd.size()
    pipeline = evaluator.pipeline
    batches = fixed_training_batches(pipeline.images, pipeline.labels, pipeline.batch_size, count,
                                     pipeline.augment.test, evaluator.device)

    def both(model: nn.Module, prefix: str) -> Dict[str, float]:
        return {f"{prefix}hessian_trace": hessian_trace(model, cross_entropy_loss, batches, samples, seed, world),
                f"{prefix}hessian_top_eigenvalue": top_eigenvalue(model, cross_entropy_loss, batches, iters, seed,
                                                                  world)}

    centre = evaluator.centre(world, rank, size, "flatness.centre", own_centre=True)
    figures = both(centre, "")
    leader = getattr(evaluator.opt, "global_leader", None)
    if leader is not None:
        import copy

        model = copy.deepcopy(evaluator.model)
        with torch.no_grad():
            for i, tensor in enumerate(model.state_dict().values()):
                hvd.broadcast_(tensor, root_rank=leader, name=f"flatness.leader.{i}")
        figures.update(both(model, "leader_"))
    return figures
