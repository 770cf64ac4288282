"""``python -m horovod_leader.compare``: several methods one after another in one launch,
which lives in ``horovod_leader.training.compare``."""
import sys

from horovod_leader.training.compare import main

if __name__ == "__main__":
    sys.exit(main())
