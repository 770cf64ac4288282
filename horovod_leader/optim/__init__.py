"""The distributed optimizer wrappers, one module each, all driven by ``opt.step(loss)``."""
from horovod_leader.optim.base import DistributedWrapper
from horovod_leader.optim.data_parallel import DataParallel
from horovod_leader.optim.diloco import DiLoCo
from horovod_leader.optim.easgd import EASGD
from horovod_leader.optim.grawa import GRAWA
from horovod_leader.optim.local_sgd import LocalSGD
from horovod_leader.optim.lsgd import LSGD
from horovod_leader.optim.one_sided_easgd import OneSidedEASGD

__all__ = ["DistributedWrapper", "LSGD", "GRAWA", "EASGD", "LocalSGD", "DataParallel", "OneSidedEASGD", "DiLoCo"]
