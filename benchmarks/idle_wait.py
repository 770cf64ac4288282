"""Benchmark: what ranks that wait in a collective cost a rank that computes, per launcher.

    python benchmarks/idle_wait.py                 # shared memory, and the emulated cluster's launchers
    python benchmarks/idle_wait.py --modes shm --no-markdown

The emulated cluster's nodes share this machine's cores. A rank that waits for a collective
either sleeps in the kernel, yields its core to whoever wants it, or spins on it. Each mode
runs 4 ranks (2 emulated nodes x 2, links of 1 Gbit/s; or one node over shared memory): rank 0
multiplies matrices for a fixed amount of work twice, first while the other ranks sleep
(``time.sleep`` for longer than that work, no collective), then while they wait for it in a
Horovod all-reduce. The
figures are rank 0's compute time in the second phase over the first (1.00: waiting costs
nothing), and the CPU seconds each waiting rank burnt per second of waiting (about 0: it
sleeps; about 1: it spins, yielding or not).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mpi_launch import REPO  # noqa: E402

MODES = {  # name -> (launcher, emulated)
    "shm": ("mpirun", False),
    "emulated-mpirun": ("mpirun", True),
    "emulated-horovodrun": ("horovodrun", True),
    "emulated-horovodrun-gloo": ("horovodrun-gloo", True),
}
WORK = 1500  # 256x256 float32 matrix products per phase (about a second here)
SLEEP = 6.0  # seconds the other ranks sleep in the first phase


def compute() -> float:
    import torch

    a = torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(WORK):
        a = torch.tanh(a @ a / 16.0)
    return time.perf_counter() - start


def worker() -> None:
    import horovod.torch as hvd
    import torch

    hvd.init()
    rank = hvd.rank()
    hvd.allreduce(torch.zeros(1), name="idle.start")
    # Phase 1: the others sleep through rank 0's work (SLEEP is longer than it).
    start = time.perf_counter()
    alone = compute() if rank == 0 else 0.0
    time.sleep(max(SLEEP - (time.perf_counter() - start), 0.0))
    hvd.allreduce(torch.zeros(1), name="idle.phase1")
    # Phase 2: the others wait for rank 0 in a collective.
    wall, cpu = time.perf_counter(), time.process_time()
    with_waiters = compute() if rank == 0 else 0.0
    hvd.allreduce(torch.zeros(1), name="idle.phase2")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = hvd.allgather_object((alone, with_waiters, cpu / wall), name="idle.results")
    if rank == 0:
        if alone > SLEEP:
            raise SystemExit(f"rank 0's work took {alone:.1f} s, longer than the others' sleep ({SLEEP} s)")
        print("RESULT " + json.dumps({"alone_s": rows[0][0], "with_waiters_s": rows[0][1],
                                      "waiting_cpu_per_s": [r[2] for r in rows[1:]]}), flush=True)
    hvd.shutdown()


def run_mode(mode: str) -> dict:
    launcher, emulated = MODES[mode]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    if emulated:
        cmd = ["bash", str(REPO / "launch" / "emulated_cluster.sh"), "2", "2", str(Path(__file__).resolve()),
               "--worker"]
        env.update(LINK_RATE="1gbit", EMULATED_LAUNCHER=launcher)
    else:
        cmd = ["mpirun", "-np", "4", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
        cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
        cmd += [sys.executable, "-u", str(Path(__file__).resolve()), "--worker"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if "RESULT " in line]
    if out.returncode != 0 or not lines:
        return {"mode": mode, "status": f"failed (exit {out.returncode})", "tail": (out.stdout + out.stderr)[-2000:]}
    # the launcher may append another rank's output to the line: read the one JSON object
    result, _ = json.JSONDecoder().raw_decode(lines[-1].split("RESULT ", 1)[1])
    return {"mode": mode, "status": "ok", **result, "ratio": result["with_waiters_s"] / result["alone_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=3, help="launches per mode")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    from report_tables import git_revision, machine_description, markdown_table, today, update_section

    rows = []
    for mode in args.modes.split(","):
        results = [run_mode(mode) for _ in range(args.repeats)]
        ok = [r for r in results if r["status"] == "ok"]
        if not ok:
            print(f"{mode}: {results[0]['status']}\n{results[0]['tail']}", flush=True)
            rows.append([mode, results[0]["status"], "-", "-", "-"])
            continue
        mean = lambda key: sum(r[key] for r in ok) / len(ok)
        spin = sum(sum(r["waiting_cpu_per_s"]) / len(r["waiting_cpu_per_s"]) for r in ok) / len(ok)
        print(f"{mode}: compute {mean('alone_s'):.2f} s alone, {mean('with_waiters_s'):.2f} s with 3 ranks waiting "
              f"({mean('ratio'):.2f}x); waiting ranks burn {spin:.2f} CPU s per s", flush=True)
        rows.append([mode, f"{mean('alone_s'):.2f}", f"{mean('with_waiters_s'):.2f}", f"{mean('ratio'):.2f}x",
                     f"{spin:.2f}"])
    table = markdown_table(["launch", "rank 0's compute, others asleep (s)", "the same, others waiting in an "
                            "all-reduce (s)", "ratio", "CPU s burnt per s of waiting, per waiting rank"], rows)
    print(table)
    if not args.no_markdown:
        update_section("idle_wait", f"Machine: {machine_description()}. Date: {today()}. Revision: {git_revision()}."
                       f"\nCommand: `python benchmarks/idle_wait.py`; {args.repeats} launches per mode, means.\n\n"
                       + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
