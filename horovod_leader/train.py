"""``python -m horovod_leader.train`` (also ``horovod-leader-train``): the training command,
which lives in ``horovod_leader.training.command``."""
import sys

from horovod_leader.training.command import main

if __name__ == "__main__":
    sys.exit(main())
