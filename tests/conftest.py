"""Suite-wide: without Horovod (``HOROVOD_LEADER_SKIP_HOROVOD=1``, or a failed build), the checks
that need it (marked ``horovod``, and every launch of ``mpi_harness.run_mpi``) skip, saying so,
and the torch engine's checks still run."""
from __future__ import annotations

from typing import Optional

import pytest


def _horovod_missing() -> Optional[str]:
    try:
        import horovod.torch  # noqa: F401
    except ImportError as error:
        return (f"Horovod is not installed here ({error}): the set-up skipped it (HOROVOD_LEADER_SKIP_HOROVOD=1) "
                "or its build failed; the toolkit runs on its torch engine, whose checks still run")
    return None


#: why the checks that need Horovod cannot run here; None when Horovod is installed
HOROVOD_MISSING = _horovod_missing()


def pytest_collection_modifyitems(config, items):
    if HOROVOD_MISSING is None:
        return
    skip = pytest.mark.skip(reason=HOROVOD_MISSING)
    for item in items:
        if item.get_closest_marker("horovod") is not None:
            item.add_marker(skip)
