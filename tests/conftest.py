"""Suite-wide: without Horovod (``HOROVOD_LEADER_SKIP_HOROVOD=1``, or a failed build), the checks
that need it (marked ``horovod``, and every launch of ``mpi_harness.run_mpi``) skip, saying so,
and the torch engine's checks still run."""
import pytest

from mpi_harness import HOROVOD_MISSING


def pytest_collection_modifyitems(config, items):
    if HOROVOD_MISSING is None:
        return
    skip = pytest.mark.skip(reason=HOROVOD_MISSING)
    for item in items:
        if item.get_closest_marker("horovod") is not None:
            item.add_marker(skip)
