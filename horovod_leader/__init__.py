"""horovod_leader: Leader SGD (LSGD) and GRAWA distributed optimizers for PyTorch, over Horovod and
MPI, or over torch.distributed.

The library, what a user's own training loop imports:

* ``init``, ``Topology``: node-local groups and their process sets (``topology``); how the
  ranks were launched (``launcher``)
* ``engine``: which collectives run underneath, Horovod (the default) or torch.distributed
  (``init(backend=...)``, ``HOROVOD_LEADER_BACKEND``, or automatically under ``torchrun``)
* the wrappers (``optim/``): ``LSGD``, ``GRAWA``, ``EASGD``, ``OneSidedEASGD``, ``LocalSGD``,
  ``DiLoCo``, ``DataParallel``, on the contract of ``optim.base.DistributedWrapper``
* ``Compression``: the bf16 and int8 codecs of compressed exchanges (``compression``)
* ``AllWorkersDiverged``, raised on every rank together (``errors``)
* ``fused``: the fused two-force update (``csrc/`` holds the C++/CUDA kernels)
* underneath: ``comm`` (collectives with ``comm_bytes``), ``packing`` (flat buffers),
  ``election``, ``grawa_weights``, ``health``, ``async_schedule``, ``registry`` (one
  ``MethodSpec`` per method), ``hessian`` (the Hessian's trace and top eigenvalue)

The application, the training command and its parts, is ``horovod_leader.training``
(``python -m horovod_leader.train``, ``python -m horovod_leader.report``).

``import horovod_leader`` works without Horovod installed, and so does everything on the
torch engine; the Horovod engine imports Horovod when it is used.
"""
from horovod_leader import engine, fused
from horovod_leader.compression import Compression
from horovod_leader.errors import AllWorkersDiverged
from horovod_leader.optim import EASGD, GRAWA, LSGD, DataParallel, DiLoCo, LocalSGD, OneSidedEASGD
from horovod_leader.topology import Topology, init

__version__ = "0.1.0"
__all__ = ["init", "Topology", "LSGD", "GRAWA", "EASGD", "LocalSGD", "DataParallel", "OneSidedEASGD", "DiLoCo",
           "Compression", "AllWorkersDiverged", "engine", "fused", "__version__"]
