"""``python -m horovod_leader.report`` (also ``horovod-leader-report``): the report of training
runs, which lives in ``horovod_leader.training.report``."""
import sys

from horovod_leader.training.report import main

if __name__ == "__main__":
    sys.exit(main())
