"""horovod_leader: Leader SGD (LSGD) and GRAWA distributed optimizers for PyTorch, over Horovod and MPI.

Where things are:

* ``topology.py``   node-local groups (mpi4py) and their Horovod process sets: ``init()``
* ``election.py``   leader election: score windows, argmin with NaN and tie rules
* ``fused.py``      the fused two-force update (``csrc/`` holds the C++/CUDA kernels)
* ``flat.py``       packing a model into one flat buffer per dtype and device
* ``comm.py``       Horovod collectives with ``comm_bytes`` accounting
* ``grawa_weights.py`` GRAWA's inverse-gradient-norm weights
* ``optim/``        the wrappers: ``LSGD``, ``GRAWA``, ``EASGD``, ``LocalSGD``, ``DataParallel``,
                    ``OneSidedEASGD``, ``DiLoCo``
* ``compression.py`` bf16 and int8 payloads for compressed exchanges
* ``errors.py``     ``AllWorkersDiverged``, raised on every rank together

``import horovod_leader`` works without Horovod installed; only the communicating parts
(``init`` and the wrappers) need it, and import it when used.
"""
from horovod_leader import fused
from horovod_leader.errors import AllWorkersDiverged
from horovod_leader.optim import EASGD, GRAWA, LSGD, DataParallel, DiLoCo, LocalSGD, OneSidedEASGD
from horovod_leader.topology import Topology, init

__version__ = "0.1.0"
__all__ = ["init", "Topology", "LSGD", "GRAWA", "EASGD", "LocalSGD", "DataParallel", "OneSidedEASGD", "DiLoCo",
           "AllWorkersDiverged", "fused", "__version__"]
