"""Benchmark: this toolkit beside what users would pick instead, on the emulated cluster.

    python benchmarks/peers/run.py                          # 100mbit and 1gbit, 3 seeds, 60 s each
    python benchmarks/peers/run.py --rates shm --seeds 0 --budget 5 --no-markdown --out /tmp/p   # a tiny run

Each peer runs through its own public API (``peer_rank.py``) on the cluster benchmark's data,
model, batch, seed, budget, link rates and training clock, beside the toolkit's matching
method and the communication-free run, all in one grid of ``benchmarks/cluster.py`` (its
options apply). The pairs compared at equal settings:

* the toolkit's local SGD (tau = 16) and PyTorch's ``PostLocalSGDOptimizer`` with
  ``PeriodicModelAverager(16)`` (and ``HierarchicalModelAverager``: every 4 steps inside a node,
  every 16 across the nodes);
* the toolkit's DiLoCo (H = 16, outer SGD lr 0.7, Nesterov momentum 0.9) and torchft's
  ``DiLoCo`` (the same), and torchft's ``LocalSGD`` (sync every 16);
* the toolkit's data-parallel SGD and Horovod's ``DistributedOptimizer`` (the same code).

A peer that cannot be installed or run here is not faked: the run says why
(``PROGRAM_CHECKS``). The runs go to ``benchmarks/results/peers/`` (``--out``), the tables to
BENCHMARKS.md's ``peers`` section (``--section``).
"""
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cluster  # noqa: E402

PROGRAM = HERE / "peer_rank.py"
PEERS = {
    "torch-localsgd": ["--peer", "torch-localsgd", "--period", "16"],
    "torch-hierarchical": ["--peer", "torch-hierarchical", "--period", "4", "--global-period", "16"],
    "torchft-diloco": ["--peer", "torchft-diloco", "--period", "16"],
    "torchft-localsgd": ["--peer", "torchft-localsgd", "--period", "16"],
    "horovod-dp": ["--peer", "horovod-dp"],
}
TOOLKIT = ["nocomm", "localsgd", "diloco", "dp"]  # the toolkit's side of each pair, and the compute limit


def torchft_missing():
    try:
        import torchft  # noqa: F401
    except ImportError as error:
        return f"torchft is not installed ({error}); pip install torchft==0.2.0"
    if lighthouse() is None:
        return "torchft's lighthouse (torchft_lighthouse) is neither beside this Python nor on PATH"
    return None


def lighthouse():
    """torchft's lighthouse program: beside this interpreter (a virtual environment's bin), or on PATH."""
    beside = Path(sys.executable).parent / "torchft_lighthouse"
    return str(beside) if beside.exists() else shutil.which("torchft_lighthouse")


def register() -> None:
    for name, options in PEERS.items():
        cluster.ALL_METHODS[name] = options
        cluster.PROGRAMS[name] = PROGRAM
        if name.startswith("torchft"):
            cluster.PROGRAM_CHECKS[name] = torchft_missing


def main(argv=None) -> int:
    register()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = ["benchmarks/peers/run.py", *argv]  # what to record: the defaults below are this script's
    if "--methods" not in argv:
        argv += ["--methods", ",".join(TOOLKIT + list(PEERS))]
    if "--rates" not in argv:
        argv += ["--rates", "100mbit,1gbit"]
    if "--out" not in argv:  # a results folder of their own: one folder holds one setting and one grid's runs
        argv += ["--out", str(HERE.parent / "results" / "peers")]
    if "--section" not in argv:
        argv += ["--section", "peers"]
    return cluster.main(argv, command=command)


if __name__ == "__main__":
    sys.exit(main())
